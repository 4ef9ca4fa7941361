"""Read-ahead for one open file.

The kernel sends reads of at most a few hundred KiB, and each one costs the
mount a round trip to the sandbox: on the shell fallback, a whole new
process. For backends that ask for it (`Backend.read_ahead`), when a
program reads a file in order,
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

# The default most one fetch requests; one open file keeps at most twice it.
MAX_LIMIT = 4 << 20

Fetch = Callable[[int, int], Awaitable[bytes]]


class _Fetch:
    """A fetch under way: the bytes it will bring, and an event set when it ends."""

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.done = trio.Event()


class ReadAhead:
    """The bytes fetched past a sequential read, and where the next one is expected.

    Reads do not wait for each other, because the kernel sends several
    reads of one file at once and the sandbox serves them side by side. A
    read whose bytes a fetch under way will bring waits for that fetch.
    """

    def __init__(self, limit: int = MAX_LIMIT) -> None:
        self.limit = limit
        self._start = 0
        self._data = b""
        # The fetch that filled `_data` came back short: the file ends there.
        self._at_end = False
        self._expected = 0
        self._window = 0
        self._fetches: list[_Fetch] = []
        # Counts `drop` calls, so that a fetch that started before one is not kept.
        self._version = 0

    def drop(self) -> None:
        """Forget the kept bytes, after the file changed through the mount."""
        self._data = b""
        self._at_end = False
        self._window = 0
        self._version += 1

    async def read(self, fetch: Fetch, offset: int, size: int) -> bytes:
        """Return up to `size` bytes at `offset`, from kept bytes or through `fetch`."""
        kept = await self._wait_for_kept(offset, size)
        if kept is not None:
            self._expected = offset + len(kept)
            return kept

        # The kernel may send the reads of one sequential pass out of order
        # or at once, so a read that starts where kept or coming bytes end
        # counts as sequential too.
        ends = {self._expected, self._start + len(self._data)} | {f.end for f in self._fetches}
        if offset not in ends:
            # A random read: fetch only its bytes, and leave the kept ones.
            self._window = 0
            self._expected = offset + size
            return await fetch(offset, size)

        self._window = min(max(self._window * 2, size * 2), self.limit)
        want = max(size, self._window)
        data = await self._fetch_and_keep(fetch, offset, want)
        self._expected = max(self._expected, offset + min(size, len(data)))
        return data[:size]

    async def _wait_for_kept(self, offset: int, size: int) -> bytes | None:
        """Return the kept bytes for the read, after any fetch under way that brings them."""
        while True:
            kept = self._kept(offset, size)
            if kept is not None:
                return kept
            under_way = next((f for f in self._fetches if f.start <= offset and offset + size <= f.end), None)
            if under_way is None:
                return None
            await under_way.done.wait()

    async def _fetch_and_keep(self, fetch: Fetch, offset: int, want: int) -> bytes:
        """Fetch `want` bytes at `offset` and keep them, unless the file changed meanwhile."""
        record = _Fetch(offset, offset + want)
        self._fetches.append(record)
        version = self._version
        try:
            data = await fetch(offset, want)
        finally:
            self._fetches.remove(record)
            record.done.set()
        if version == self._version:
            self._keep(offset, data, at_end=len(data) < want)
        return data

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
