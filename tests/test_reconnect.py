"""ReconnectingBackend and the core's handling of a new connection, on the in-memory backend.

Each `Link` is one connection to a shared MemoryBackend, which stands for
the sandbox: cutting a link loses that connection and keeps the files.
The faults on real sandboxes (helper killed, container restarted, ssh
dropped) are in tests/test_faults.py.
"""

from __future__ import annotations

import errno
import os

import pytest
import trio
import trio.testing

from sandboxfs.backend import BackendError, ConnectError, Identity
from sandboxfs.backends.memory import MemoryBackend
from sandboxfs.core import FilesystemCore, FsError
from sandboxfs.inodes import ROOT_INODE
from sandboxfs.options import MountOptions
from sandboxfs.reconnect import FIRST_RETRY_DELAY, MAX_RETRY_DELAY, ReconnectingBackend

ROOT = "/sandbox"


class Link:
    """One connection to `sandbox`; after `cut`, every request fails with `unavailable`."""

    def __init__(self, sandbox: MemoryBackend) -> None:
        self.sandbox = sandbox
        self.connected = True
        self.closed = False
        self.root = sandbox.root
        self.identity = sandbox.identity
        self.max_chunk = sandbox.max_chunk
        self.read_ahead = sandbox.read_ahead

    def cut(self) -> None:
        self.connected = False

    def __getattr__(self, name: str):
        method = getattr(self.sandbox, name)

        async def call(*args, **kwargs):
            if not self.connected:
                raise BackendError("unavailable", "", "the link was cut")
            return await method(*args, **kwargs)

        return call

    async def aclose(self) -> None:
        self.closed = True
        self.connected = False


class Connector:
    """The `connect` function of a mount: makes Links, or refuses with `refusal`."""

    def __init__(self) -> None:
        self.sandbox = MemoryBackend(root=ROOT, identity=Identity(os.getuid(), os.getgid()))
        self.links: list[Link] = []
        self.refusal: str | None = None
        self.attempts = 0

    async def __call__(self) -> Link:
        self.attempts += 1
        if self.refusal is not None:
            raise ConnectError(self.refusal)
        link = Link(self.sandbox)
        self.links.append(link)
        return link

    @property
    def link(self) -> Link:
        return self.links[-1]


def start() -> tuple[Connector, ReconnectingBackend, list[str]]:
    connector = Connector()
    states: list[str] = []
    first = trio.run(connector)
    backend = ReconnectingBackend(first, connector, on_health_change=states.append)
    return connector, backend, states


def run(function, *args):
    """Run an async test body on a clock that jumps over sleeps, with a deadline."""

    async def main():
        with trio.fail_after(60):
            return await function(*args)

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_lost_connection_is_replaced_before_the_request():
    connector, backend, states = start()
    trio.run(connector.sandbox.write_file, f"{ROOT}/a", b"data")
    first = connector.link
    first.cut()

    assert run(backend.read_file, f"{ROOT}/a") == b"data"
    assert first.closed
    assert len(connector.links) == 2
    assert backend.generation == 1
    assert states == ["broken: the connection to the sandbox was lost", "ok"]


def test_idempotent_request_resent_after_break():
    connector, backend, _ = start()
    trio.run(connector.sandbox.write_file, f"{ROOT}/a", b"data")
    connector.sandbox.fail("read", "unavailable")

    assert run(backend.read, f"{ROOT}/a", 0, 4) == b"data"
    assert backend.generation == 1
    assert len(connector.sandbox.calls_to("read")) == 2


def test_other_request_gets_eio_after_break():
    connector, backend, _ = start()
    connector.sandbox.fail("mkdir", "unavailable")

    async def body():
        with pytest.raises(BackendError) as info:
            await backend.mkdir(f"{ROOT}/d", 0o755)
        assert info.value.code == "io_error"
        assert info.value.errno == errno.EIO
        # The next request gets a new connection.
        await backend.mkdir(f"{ROOT}/e", 0o755)

    run(body)
    assert len(connector.sandbox.calls_to("mkdir")) == 2
    assert backend.generation == 1


def test_unreachable_sandbox_fails_fast_then_retries():
    connector, backend, states = start()
    connector.link.cut()
    connector.refusal = "container 'box' is not running: start it with `docker start box`"

    async def body():
        for _ in range(3):
            with pytest.raises(BackendError) as info:
                await backend.stat(ROOT)
            assert info.value.code == "unavailable"
            assert "docker start box" in info.value.message
        # Only the first request tried to connect; the others failed at once.
        assert connector.attempts == 2
        await trio.sleep(FIRST_RETRY_DELAY)
        with pytest.raises(BackendError):
            await backend.stat(ROOT)
        assert connector.attempts == 3
        connector.refusal = None
        await trio.sleep(MAX_RETRY_DELAY)
        return await backend.stat(ROOT)

    assert run(body).is_dir
    assert states == [
        "broken: the connection to the sandbox was lost",
        "broken: container 'box' is not running: start it with `docker start box`",
        "ok",
    ]


def test_retry_delay_grows_to_a_bound():
    connector, backend, _ = start()
    connector.link.cut()
    connector.refusal = "gone"

    async def body():
        started = trio.current_time()
        attempts = []
        while trio.current_time() - started < 45:
            with pytest.raises(BackendError):
                await backend.stat(ROOT)
            if connector.attempts != len(attempts) + 1:
                attempts.append(trio.current_time() - started)
            await trio.sleep(0.25)
        return attempts

    attempts = run(body)
    gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:])]
    assert gaps[0] == pytest.approx(FIRST_RETRY_DELAY, abs=0.3)
    assert max(gaps) == pytest.approx(MAX_RETRY_DELAY, abs=0.3)
    assert gaps == sorted(gaps)


def test_timeout_gives_eio_and_reconnects():
    connector, backend, states = start()
    connector.sandbox.fail("list_dir", "timed_out")

    async def body():
        with pytest.raises(BackendError) as info:
            await backend.list_dir(ROOT)
        assert info.value.errno == errno.EIO
        first = connector.links[0]
        assert first.closed
        return await backend.list_dir(ROOT)

    assert run(body) == []
    assert backend.generation == 1
    assert states[-1] == "ok"


def test_sandbox_errors_keep_the_connection():
    connector, backend, states = start()

    async def body():
        with pytest.raises(BackendError) as info:
            await backend.stat(f"{ROOT}/missing")
        assert info.value.code == "file_not_found"

    run(body)
    assert len(connector.links) == 1
    assert states == []


# The core: files open across a new connection.


def make_core(tmp_path) -> tuple[Connector, FilesystemCore]:
    connector, backend, _ = start()
    options = MountOptions(staging_dir=str(tmp_path / "staging"), recovery_dir=str(tmp_path / "recovery"))
    return connector, FilesystemCore(backend, options)


async def open_file(core: FilesystemCore, name: str, flags: int) -> int:
    node, _ = await core.lookup(ROOT_INODE, name)
    fh, _ = await core.open(node.ino, flags)
    return fh


def test_file_opened_before_a_new_connection_reads_eio(tmp_path):
    connector, core = make_core(tmp_path)
    trio.run(connector.sandbox.write_file, f"{ROOT}/a", b"old content")

    async def body():
        before = await open_file(core, "a", os.O_RDONLY)
        assert await core.read(before, 0, 3) == b"old"
        connector.link.cut()
        await connector.sandbox.write_file(f"{ROOT}/a", b"new content")
        after = await open_file(core, "a", os.O_RDONLY)
        assert await core.read(after, 0, 3) == b"new"
        with pytest.raises(FsError) as info:
            await core.read(before, 0, 3)
        assert info.value.errno == errno.EIO
        await core.release(before)
        await core.release(after)

    run(body)


def test_writes_made_before_a_new_connection_are_uploaded(tmp_path):
    connector, core = make_core(tmp_path)
    trio.run(connector.sandbox.write_file, f"{ROOT}/a", b"")

    async def body():
        fh = await open_file(core, "a", os.O_WRONLY)
        await core.write(fh, 0, b"written before the fault")
        connector.link.cut()
        await core.write(fh, 24, b", and after")
        await core.flush(fh)
        await core.release(fh)
        return await connector.sandbox.read_file(f"{ROOT}/a")

    assert run(body) == b"written before the fault, and after"
    assert not (tmp_path / "recovery").exists()
