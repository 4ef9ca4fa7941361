"""Read-ahead for one open file.

The kernel sends reads of at most a few hundred KiB, and each one costs the
mount a round trip to the sandbox: a request to the helper, or a whole new
process on the shell fallback. When a program reads a file in order,
`ReadAhead` requests more from the sandbox than the kernel requested, doubling
the amount on each sequential read up to a limit, and serves the following
reads from what it kept.

What it keeps is as fresh as the kernel's own page cache for an open file:
changes made in the sandbox show after the file is opened again. The core
drops the kept bytes when it changes the file's size itself.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import trio

# Bounds of the largest fetch: at least one kernel read request, at most
# 4 MiB. One open file keeps at most twice the limit.
MIN_LIMIT = 128 << 10
MAX_LIMIT = 4 << 20

Fetch = Callable[[int, int], Awaitable[bytes]]


def limit_for(max_chunk: int) -> int:
    """Return the read-ahead limit for a backend that handles `max_chunk` bytes per request well."""
    return min(max(max_chunk, MIN_LIMIT), MAX_LIMIT)


class ReadAhead:
    """The bytes fetched past a sequential read, and where the next one is expected."""

    def __init__(self, limit: int = MAX_LIMIT) -> None:
        self.limit = limit
        self._start = 0
        self._data = b""
        # The fetch that filled `_data` came back short: the file ends there.
        self._at_end = False
        self._expected = 0
        self._window = 0
        # Concurrent reads of one file wait for a fetch under way, which
        # usually contains the bytes they need.
        self._lock = trio.Lock()

    def drop(self) -> None:
        """Forget the kept bytes, after the file changed through the mount."""
        self._data = b""
        self._at_end = False
        self._window = 0

    async def read(self, fetch: Fetch, offset: int, size: int) -> bytes:
        """Return up to `size` bytes at `offset`, from kept bytes or through `fetch`."""
        async with self._lock:
            kept = self._kept(offset, size)
            if kept is not None:
                self._expected = offset + len(kept)
                return kept
            kept_end = self._start + len(self._data)
            # The kernel may send the reads of one sequential pass out of
            # order, so a read that starts where the kept bytes end counts too.
            if offset not in (self._expected, kept_end):
                # A random read: fetch what it asks for, and keep what is kept.
                self._window = 0
                self._expected = offset + size
                return await fetch(offset, size)
            self._window = min(max(self._window * 2, size * 2), self.limit)
            want = max(size, self._window)
            data = await fetch(offset, want)
            self._keep(offset, data, at_end=len(data) < want)
            self._expected = offset + min(size, len(data))
            return data[:size]

    def _keep(self, offset: int, data: bytes, at_end: bool) -> None:
        """Keep fetched bytes: after the kept ones when they follow on, else in their place."""
        if self._data and offset == self._start + len(self._data):
            joined = self._data + data
            surplus = max(0, len(joined) - 2 * self.limit)
            self._start, self._data = self._start + surplus, joined[surplus:]
        else:
            self._start, self._data = offset, data
        self._at_end = at_end

    def _kept(self, offset: int, size: int) -> bytes | None:
        """Return the kept bytes for the read, or None when they do not cover it."""
        end = self._start + len(self._data)
        if not self._start <= offset <= end:
            return None
        if offset + size > end and not self._at_end:
            return None
        return self._data[offset - self._start : offset - self._start + size]
