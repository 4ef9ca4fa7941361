"""Keep a mount connected to its sandbox across faults.

A sandbox can go away under a mount and come back: the helper process is
killed, the container restarts, the ssh connection drops, the sandbox stops
replying for a while. `ReconnectingBackend` sits between the filesystem
core and the backend of the current connection, so that the mount outlives
any one connection:

- A connection that is known to be lost is replaced before the next request
  is sent, so a helper that died while the mount was idle costs nothing.
- A request that fails because the connection broke while it was under way
  is sent once more on a new connection if sending it twice does the same as
  once (reads, writes at an offset, attribute changes). Other requests
  (create, mkdir, rename, unlink, ...) may or may not have been done, so
  they fail with EIO and the caller looks before trying again.
- A request that gets no reply within the timeout fails with EIO, and the
  connection is dropped: a helper stuck on one request would hold up every
  request queued behind it.
- While the sandbox cannot be reached, a new connection is tried at once,
  then no more often than a growing delay allows (up to `MAX_RETRY_DELAY`).
  Requests in between fail at once with ENOTCONN instead of waiting.

`generation` counts the connections made after the first. The core compares
it with the one a file was opened under: data cached before a fault may no
longer be the sandbox's, so such a file reads as EIO.
"""

from __future__ import annotations

import functools
import logging
from typing import Awaitable, Callable

import trio

from .backend import Backend, BackendError, ConnectError, Stat, StatFs

logger = logging.getLogger(__name__)

FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 10.0
# How long closing a lost connection may take: a frozen sandbox may never
# reap its helper.
CLOSE_LIMIT = 10.0

Connect = Callable[[], Awaitable[Backend]]


def _forward(idempotent: bool):
    """Make a method that sends the same call to the current connection."""

    def decorate(method):
        name = method.__name__

        @functools.wraps(method)
        async def call(self: ReconnectingBackend, *args, **kwargs):
            return await self._call(name, idempotent, args, kwargs)

        return call

    return decorate


class ReconnectingBackend(Backend):
    """A backend that connects again, through `connect`, when its connection is lost.

    `backend` is the first connection, already made. `on_health_change` is
    called with "ok", or with "broken: REASON", each time that changes.
    """

    def __init__(self, backend: Backend, connect: Connect, on_health_change=None) -> None:
        self._backend: Backend | None = backend
        self._connect = connect
        self._lock = trio.Lock()
        self._retry_at = 0.0
        self._retry_delay = FIRST_RETRY_DELAY
        self.generation = 0
        self.health = "ok"
        self.on_health_change = on_health_change
        self._adopt(backend)

    # Connections.

    def _adopt(self, backend: Backend) -> None:
        self._backend = backend
        self.root = backend.root
        self.identity = backend.identity
        self.max_chunk = backend.max_chunk
        self.read_ahead = backend.read_ahead

    def _set_health(self, status: str) -> None:
        if status == self.health:
            return
        self.health = status
        if status == "ok":
            logger.warning("the sandbox can be reached again; generation %d", self.generation)
        else:
            logger.error(
                "the sandbox cannot be reached (%s); operations fail with ENOTCONN until it is back",
                status.removeprefix("broken: "),
            )
        if self.on_health_change is not None:
            self.on_health_change(status)

    async def _current(self) -> Backend:
        """Return a live connection, or raise `unavailable` saying why there is none."""
        backend = self._backend
        if backend is not None and backend.connected:
            return backend
        async with self._lock:
            if self._backend is not None and self._backend.connected:
                return self._backend
            if self._backend is not None:
                await self._drop(self._backend, "the connection to the sandbox was lost")
            if trio.current_time() < self._retry_at:
                raise BackendError("unavailable", "", self.health.removeprefix("broken: "))
            return await self._reconnect()

    async def _reconnect(self) -> Backend:
        try:
            backend = await self._connect()
        except ConnectError as exc:
            self._retry_at = trio.current_time() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, MAX_RETRY_DELAY)
            self._set_health(f"broken: {exc}")
            raise BackendError("unavailable", "", str(exc)) from exc
        self.generation += 1
        self._retry_delay = FIRST_RETRY_DELAY
        self._adopt(backend)
        logger.warning("connected to the sandbox again")
        self._set_health("ok")
        return backend

    async def _drop(self, backend: Backend, reason: str) -> None:
        """Close a connection that failed; later requests make a new one."""
        if self._backend is not backend:
            return
        self._backend = None
        self._set_health(f"broken: {reason}")
        with trio.move_on_after(CLOSE_LIMIT) as scope:
            scope.shield = True
            try:
                await backend.aclose()
            except Exception as exc:  # the connection is gone either way
                logger.info("closing the lost connection failed: %s", exc)
        if scope.cancelled_caught:
            logger.warning("closing the lost connection took over %s s; left it behind", CLOSE_LIMIT)

    async def _call(self, name: str, idempotent: bool, args: tuple, kwargs: dict):
        backend = await self._current()
        try:
            return await getattr(backend, name)(*args, **kwargs)
        except BackendError as exc:
            if exc.code == "timed_out":
                await self._drop(backend, exc.message or "the sandbox did not answer in time")
                raise
            if exc.code != "unavailable":
                raise
            await self._drop(backend, exc.message or "the connection to the sandbox was lost")
            if not idempotent:
                raise BackendError(
                    "io_error", exc.path, f"the connection was lost during {name}; it may or may not have been done"
                ) from exc
        backend = await self._current()
        logger.info("sending %s again on the new connection", name)
        return await getattr(backend, name)(*args, **kwargs)

    async def aclose(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            await backend.aclose()

    # Requests. A request that can be sent twice with the same effect is
    # marked idempotent.

    @_forward(idempotent=True)
    async def stat(self, path: str, follow: bool = False) -> Stat: ...

    @_forward(idempotent=True)
    async def list_dir(self, path: str) -> list[tuple[str, Stat]]: ...

    @_forward(idempotent=True)
    async def statfs(self, path: str) -> StatFs: ...

    @_forward(idempotent=True)
    async def readlink(self, path: str) -> str: ...

    @_forward(idempotent=True)
    async def open_check(self, path: str, writable: bool) -> Stat: ...

    @_forward(idempotent=True)
    async def read(self, path: str, offset: int, size: int) -> bytes: ...

    @_forward(idempotent=True)
    async def write(self, path: str, offset: int, data: bytes) -> None: ...

    @_forward(idempotent=True)
    async def read_file(self, path: str) -> bytes: ...

    @_forward(idempotent=True)
    async def write_file(self, path: str, content: bytes, mode: int = 0o644) -> None: ...

    @_forward(idempotent=True)
    async def truncate(self, path: str, size: int) -> None: ...

    @_forward(idempotent=True)
    async def fsync(self, path: str) -> None: ...

    @_forward(idempotent=False)
    async def create(self, path: str, mode: int, exclusive: bool = True) -> Stat: ...

    @_forward(idempotent=False)
    async def mkdir(self, path: str, mode: int) -> Stat: ...

    @_forward(idempotent=False)
    async def mknod(self, path: str, mode: int, rdev: int) -> Stat: ...

    @_forward(idempotent=False)
    async def unlink(self, path: str) -> None: ...

    @_forward(idempotent=False)
    async def rmdir(self, path: str) -> None: ...

    @_forward(idempotent=False)
    async def rename(self, old: str, new: str, noreplace: bool = False) -> None: ...

    @_forward(idempotent=False)
    async def symlink(self, target: str, path: str) -> Stat: ...

    @_forward(idempotent=False)
    async def link(self, existing: str, new: str) -> Stat: ...

    @_forward(idempotent=True)
    async def chmod(self, path: str, mode: int) -> None: ...

    @_forward(idempotent=True)
    async def chown(self, path: str, uid: int | None, gid: int | None) -> None: ...

    @_forward(idempotent=True)
    async def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None: ...
