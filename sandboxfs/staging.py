"""Writes staged in a local file and uploaded on flush, fsync and release.

A `StagedFile` belongs to one inode and is shared by all of its open handles.
The local file is sparse: it holds the bytes that programs wrote (the dirty
ranges) and, once it was needed for a read, the rest of the sandbox's file
(the base). Upload sends only the dirty ranges with `Backend.write`, then sets
the size, so appending to a large file does not send the whole file again.

When an upload fails, `save_recovery` copies what was written to the recovery
directory, so that nothing a program wrote is lost.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile

import trio

from .backend import Backend, BackendError

logger = logging.getLogger(__name__)

COPY_CHUNK = 1 << 20


class RangeSet:
    """Sorted, disjoint, half-open byte ranges [start, end)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        merged = []
        for low, high in self.ranges:
            if high < start or low > end:
                merged.append((low, high))
            else:
                start, end = min(start, low), max(end, high)
        merged.append((start, end))
        merged.sort()
        self.ranges = merged

    def clip(self, size: int) -> None:
        self.ranges = [(low, min(high, size)) for low, high in self.ranges if low < size]

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """Return the parts of [start, end) that no range covers."""
        gaps = []
        position = start
        for low, high in self.ranges:
            if high <= position:
                continue
            if low >= end:
                break
            if low > position:
                gaps.append((position, low))
            position = max(position, high)
        if position < end:
            gaps.append((position, end))
        return gaps

    def end(self) -> int:
        return self.ranges[-1][1] if self.ranges else 0


class StagedFile:
    """The pending writes of one file.

    `remote_size` is the size of the sandbox's file as last seen; `floor` is
    the lowest size the file was truncated to since the last upload (bytes of
    the sandbox's file at and above it are stale); `size` is the size programs
    see now.
    """

    def __init__(self, staging_dir: str, remote_size: int) -> None:
        self.file = tempfile.TemporaryFile(dir=staging_dir, prefix="staged-")
        self.fd = self.file.fileno()
        self.remote_size = remote_size
        self.floor = remote_size
        self.size = remote_size
        self.dirty = RangeSet()
        # Bytes below `floor` that are present in the local file.
        self.present = RangeSet()
        self.upload_lock = trio.Lock()
        # Where the last failed upload left its copy, reused by later failures.
        self.recovery_path: str | None = None

    @property
    def needs_upload(self) -> bool:
        return bool(self.dirty) or self.size != self.remote_size or self.floor < self.remote_size

    def close(self) -> None:
        self.file.close()

    # Changes programs make.

    def write(self, offset: int, data: bytes) -> int:
        written = os.pwrite(self.fd, data, offset)
        self.dirty.add(offset, offset + written)
        self.present.add(offset, offset + written)
        self.size = max(self.size, offset + written)
        return written

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        # Growing needs no dirty range: bytes at and above `floor` are local
        # truth, and upload ends by setting the size, which adds the zeros.
        self.dirty.clip(size)
        self.present.clip(size)
        self.floor = min(self.floor, size)
        self.size = size

    # Reads through a handle that has pending writes.

    async def read(self, backend: Backend, path: str, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        for low, high in self.present.gaps(offset, min(end, self.floor)):
            await self._fetch(backend, path, low, high)
        return os.pread(self.fd, end - offset, offset)

    async def _fetch(self, backend: Backend, path: str, start: int, end: int) -> None:
        position = start
        while position < end:
            chunk = await backend.read(path, position, min(backend.max_chunk, end - position))
            if not chunk:
                raise BackendError("io_error", path, "file shrank in the sandbox while open")
            os.pwrite(self.fd, chunk, position)
            position += len(chunk)
        self.present.add(start, end)

    # Upload.

    async def upload(self, backend: Backend, path: str) -> None:
        """Send the pending writes; on success the file has no pending writes.

        Writes that programs make while an upload runs stay pending for the
        next one: the dirty ranges and the truncation floor are taken over at
        the start and given back if the upload fails.
        """
        async with self.upload_lock:
            dirty, floor, size = self.dirty, self.floor, self.size
            self.dirty = RangeSet()
            self.floor = size
            try:
                await self._send(backend, path, dirty, floor, size)
            except BaseException:
                for low, high in dirty.ranges:
                    self.dirty.add(low, high)
                self.floor = min(self.floor, floor)
                raise

    async def _send(self, backend: Backend, path: str, dirty: RangeSet, floor: int, size: int) -> None:
        if floor < self.remote_size:
            await backend.truncate(path, floor)
            self.remote_size = floor
        for low, high in dirty.ranges:
            high = min(high, size)
            position = low
            while position < high:
                length = min(backend.max_chunk, high - position)
                await backend.write(path, position, os.pread(self.fd, length, position))
                position += length
            self.remote_size = max(self.remote_size, high)
        if self.remote_size != size:
            await backend.truncate(path, size)
            self.remote_size = size

    def save_recovery(self, recovery_dir: str, path: str) -> str:
        """Copy the staged bytes to the recovery directory; return the copy's path.

        Bytes that were never written or read through the mount are holes
        (zeros) in the copy. A `.source` note beside it names the sandbox path
        and, when the copy has holes, the byte ranges that hold real data.
        """
        os.makedirs(recovery_dir, mode=0o700, exist_ok=True)
        if self.recovery_path is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            base = os.path.basename(path.rstrip("/")) or "root"
            fd, self.recovery_path = tempfile.mkstemp(dir=recovery_dir, prefix=f"{stamp}-{base}-")
            os.close(fd)
        copy_path = self.recovery_path
        with open(copy_path, "wb") as copy:
            position = 0
            while position < self.size:
                chunk = os.pread(self.fd, min(COPY_CHUNK, self.size - position), position)
                if not chunk:
                    break
                copy.write(chunk)
                position += len(chunk)
            copy.truncate(self.size)
        valid = RangeSet()
        for low, high in self.present.ranges + self.dirty.ranges:
            valid.add(low, high)
        valid.add(self.floor, self.size)
        with open(copy_path + ".source", "w", encoding="utf-8", errors="surrogateescape") as note:
            note.write(f"sandbox path: {path}\nsize: {self.size}\n")
            if valid.gaps(0, self.size):
                ranges = " ".join(f"{low}-{high}" for low, high in valid.ranges)
                note.write(f"bytes holding data (others are unknown): {ranges}\n")
        return copy_path
