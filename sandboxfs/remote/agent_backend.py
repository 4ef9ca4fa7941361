"""`AgentBackend`: the Backend contract served by the sandboxfs agent.

Each method is one request over a `Channel`, except reads and writes larger
than `max_chunk`, which become several requests sent at once. The agent runs
in an untrusted sandbox, so replies are checked before use: a malformed one
raises BackendError("io_error") instead of a TypeError deep in the caller.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sandboxfs.backend import Backend, BackendError, Identity, Stat, StatFs
from sandboxfs.remote.agent import MAX_CHUNK, STAT_FIELDS
from sandboxfs.remote.channel import Channel

logger = logging.getLogger(__name__)

STATFS_FIELDS = tuple(field.name for field in dataclasses.fields(StatFs))


class AgentBackend(Backend):
    """A sandbox reached through one agent process.

    `on_close`, if given, runs after the channel is closed; the backends use
    it to stop the agent process.
    """

    max_chunk = MAX_CHUNK

    def __init__(
        self,
        channel: Channel,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.channel = channel
        self.hello_info: dict[str, Any] = {}
        self._on_close = on_close
        self._closed = False

    async def hello(self, root: str | None = None) -> dict[str, Any]:
        """Ask the agent who it runs as; set `identity` and `hello_info`.

        `root`, when given, is the mount's root: below it the agent refuses
        paths that pass through a symlink.
        """
        result, _ = await self.channel.call("hello", {} if root is None else {"root": root})
        uid = result.get("uid")
        gid = result.get("gid")
        if not _is_int(uid) or not _is_int(gid):
            raise BackendError("io_error", "", f"malformed hello reply: {result!r}")
        self.hello_info = result
        self.identity = Identity(uid, gid)
        return result

    @property
    def connected(self) -> bool:
        return not self._closed and not self.channel.closed

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.channel.aclose()
        if self._on_close is not None:
            await self._on_close()

    async def _call(
        self, op: str, label: str, /, *, payload: bytes = b"", **args: Any
    ) -> tuple[dict, bytes]:
        """Send request `op` with `args`; `label` is the path its errors name."""
        return await self.channel.call(op, args, data=payload, path=label)

    async def _call_for_stat(self, op: str, label: str, /, **args: Any) -> Stat:
        result, _ = await self._call(op, label, **args)
        return _stat_from(result.get("stat"), label)

    # Metadata.

    async def stat(self, path: str, follow: bool = False) -> Stat:
        return await self._call_for_stat("stat", path, path=path, follow=follow)

    async def open_check(self, path: str, writable: bool) -> Stat:
        return await self._call_for_stat("open_check", path, path=path, writable=writable)

    async def list_dir(self, path: str) -> list[tuple[str, Stat]]:
        result, _ = await self._call("list_dir", path, path=path)
        entries = []
        for item in result.get("items", ()):
            if not isinstance(item, list) or len(item) != 2:
                raise BackendError("io_error", path, f"malformed directory entry {item!r}")
            name, attributes = item
            if not _is_entry_name(name):
                raise BackendError("io_error", path, f"invalid entry name {name!r}")
            entries.append((name, _stat_from(attributes, path)))
        return entries

    async def statfs(self, path: str) -> StatFs:
        result, _ = await self._call("statfs", path, path=path)
        values = {name: result.get(name) for name in STATFS_FIELDS}
        if not all(_is_int(value) for value in values.values()):
            raise BackendError("io_error", path, f"malformed statfs reply: {result!r}")
        return StatFs(**values)

    async def readlink(self, path: str) -> str:
        result, _ = await self._call("readlink", path, path=path)
        target = result.get("target")
        if not isinstance(target, str):
            raise BackendError("io_error", path, f"malformed readlink reply: {result!r}")
        return target

    # Data.

    async def read(self, path: str, offset: int, size: int) -> bytes:
        if size <= self.max_chunk:
            return await self._read_chunk(path, offset, size)

        starts = range(offset, offset + size, self.max_chunk)
        sizes = [min(self.max_chunk, offset + size - start) for start in starts]
        chunks = await _gather(
            [_bind(self._read_chunk, path, start, n) for start, n in zip(starts, sizes)]
        )

        # A short chunk is the end of the file; later chunks are past it.
        until_end = []
        for chunk, expected in zip(chunks, sizes):
            until_end.append(chunk)
            if len(chunk) < expected:
                break
        return b"".join(until_end)

    async def _read_chunk(self, path: str, offset: int, size: int) -> bytes:
        _, data = await self._call("read", path, path=path, offset=offset, size=size)
        if len(data) > size:
            raise BackendError("io_error", path, f"read returned {len(data)} > {size} bytes")
        return data

    async def write(self, path: str, offset: int, data: bytes) -> None:
        view = memoryview(data)
        if len(view) <= self.max_chunk:
            await self._write_chunk(path, offset, view)
            return

        calls = [
            _bind(self._write_chunk, path, offset + start, view[start : start + self.max_chunk])
            for start in range(0, len(view), self.max_chunk)
        ]
        await _gather(calls)

    async def _write_chunk(self, path: str, offset: int, data: memoryview) -> None:
        await self._call("write", path, payload=bytes(data), path=path, offset=offset)

    async def read_file(self, path: str) -> bytes:
        """Return a whole file, fetched with one request whose reply comes in parts."""
        _, data = await self._call("read_file", path, path=path)
        return data

    async def write_file(self, path: str, content: bytes, mode: int = 0o644) -> None:
        """Create or truncate `path` and write `content` to it.

        The first chunk travels with the create request; the other chunks
        are sent at once after it.
        """
        first = content[: self.max_chunk]
        await self._call("write_file", path, payload=first, path=path, mode=mode)
        if len(content) > len(first):
            await self.write(path, len(first), memoryview(content)[len(first) :])

    async def truncate(self, path: str, size: int) -> None:
        await self._call("truncate", path, path=path, size=size)

    async def fsync(self, path: str) -> None:
        await self._call("fsync", path, path=path)

    # Namespace.

    async def create(self, path: str, mode: int, exclusive: bool = True) -> Stat:
        return await self._call_for_stat(
            "create", path, path=path, mode=mode, exclusive=exclusive
        )

    async def mkdir(self, path: str, mode: int) -> Stat:
        return await self._call_for_stat("mkdir", path, path=path, mode=mode)

    async def mknod(self, path: str, mode: int, rdev: int) -> Stat:
        return await self._call_for_stat("mknod", path, path=path, mode=mode, rdev=rdev)

    async def unlink(self, path: str) -> None:
        await self._call("unlink", path, path=path)

    async def rmdir(self, path: str) -> None:
        await self._call("rmdir", path, path=path)

    async def rename(self, old: str, new: str, noreplace: bool = False) -> None:
        await self._call("rename", old, old=old, new=new, noreplace=noreplace)

    async def symlink(self, target: str, path: str) -> Stat:
        return await self._call_for_stat("symlink", path, target=target, path=path)

    async def link(self, existing: str, new: str) -> Stat:
        return await self._call_for_stat("link", new, existing=existing, new=new)

    # Attributes.

    async def chmod(self, path: str, mode: int) -> None:
        await self._call("chmod", path, path=path, mode=mode)

    async def chown(self, path: str, uid: int | None, gid: int | None) -> None:
        await self._call("chown", path, path=path, uid=uid, gid=gid)

    async def utimens(
        self, path: str, atime_ns: int | None, mtime_ns: int | None
    ) -> None:
        await self._call("utimens", path, path=path, atime_ns=atime_ns, mtime_ns=mtime_ns)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_entry_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def _stat_from(value: Any, path: str) -> Stat:
    if (
        not isinstance(value, list)
        or len(value) != len(STAT_FIELDS)
        or not all(_is_int(number) for number in value)
    ):
        raise BackendError("io_error", path, f"malformed stat in reply: {value!r}")
    return Stat(*value)


def _bind(function, *args):
    async def bound():
        return await function(*args)

    return bound


async def _gather(calls: list) -> list:
    """Run async callables at once; return their results in order.

    Raises the BackendError of the first call that failed, after all have
    finished, so no request is left half-sent.
    """
    results: list = [None] * len(calls)
    errors: list[BackendError | None] = [None] * len(calls)

    async def run(index: int) -> None:
        try:
            results[index] = await calls[index]()
        except BackendError as exc:
            errors[index] = exc

    async with trio.open_nursery() as nursery:
        for index in range(len(calls)):
            nursery.start_soon(run, index)
    for error in errors:
        if error is not None:
            raise error
    return results
