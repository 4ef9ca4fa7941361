"""The Docker backend: a container reached through the Docker Engine API.

`connect_docker` checks the container, then starts the sandboxfs helper
(`sandboxfs.remote`) with one `docker exec` of `python3` that lives as long as
the mount, talking over the exec's hijacked connection. A container without
`python3` gets the shell fallback (`ShellBackend`), one exec per operation.

Without a tty, the Engine sends the exec's stdout and stderr multiplexed on
that connection: each frame is an 8-byte header (stream type, three zero
bytes, payload length as a big-endian 32-bit integer) and the payload. Stdin
goes the other way as raw bytes.

Blocking SDK calls (docker-py 7) run in worker threads; the hijacked socket
itself is handed to trio.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import docker
import docker.errors
import requests.exceptions
import trio

from sandboxfs.backend import Backend, BackendError, ConnectError
from sandboxfs.backends.shell import ShellBackend

logger = logging.getLogger(__name__)

_DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
_HEADER_SIZE = 8
_STDOUT = 1
_STDERR = 2
_SYSTEM_ERROR = 3
_RECEIVE_SIZE = 1 << 16

# Exit statuses of the probe that `_probe_python` runs in the container.
_PROBE_ROOT_MISSING = 3
_PROBE_ROOT_NOT_DIRECTORY = 4
_PROBE = (
    "import os, sys\n"
    "root = sys.argv[1]\n"
    "if not os.path.exists(root): sys.exit(3)\n"
    "if not os.path.isdir(root): sys.exit(4)\n"
)

# Docker 20.10 reports exit status 126 for an exec whose user is unknown or
# whose program is missing. For a missing program it also sends this text
# on stdout.
_EXEC_FAILED = 126
_NOT_FOUND_TEXT = b"executable file not found"


async def connect_docker(
    nursery: trio.Nursery,
    container: str,
    root: str = "/",
    user: str | None = None,
    read_only: bool = False,
    timeout: float = 60.0,
) -> Backend:
    """Connect to `root` in a running container and return its backend.

    `user` is a name or uid[:gid] as `docker exec --user` takes it; None means
    the container's default user. `read_only` needs no action here: in a
    container started with `--read-only`, writes fail in the container with
    EROFS, which the backend reports as `read_only`.

    Raises `ConnectError` (one line, with what to do) when the daemon cannot
    be reached, the container is not found or not running, `user` is unknown
    there, or `root` is missing or not a directory.
    """
    client = await _open_client()
    await _check_container(client, container)

    has_python = await _probe_python(client, container, root, user)
    if not has_python:
        logger.info("container %r has no python3: using the shell fallback", container)
        runner = DockerExecRunner(client, container, user)
        backend = ShellBackend(runner, root, timeout=timeout)
        await backend.start()
        return backend

    return await _start_agent(nursery, client, container, root, user, timeout)


async def _start_agent(
    nursery: trio.Nursery,
    client: docker.APIClient,
    container: str,
    root: str,
    user: str | None,
    timeout: float,
) -> Backend:
    # Imported here so that the shell fallback works without the helper.
    from sandboxfs import remote

    send_stream, receive_stream = await open_exec(
        client, container, remote.agent_command(), user, on_stderr=_StderrLogger(container)
    )
    exec_id = send_stream.exec_id

    async def wait_for_exit() -> None:
        await _wait_for_exec_exit(client, exec_id, container)

    try:
        backend = await remote.connect(
            send_stream,
            receive_stream,
            nursery,
            root,
            timeout=timeout,
            root_label=f"directory in container {container!r}",
            on_close=wait_for_exit,
        )
    except BaseException:
        with trio.CancelScope(shield=True):
            await send_stream.aclose()
            await receive_stream.aclose()
        raise
    logger.info("connected to container %r, root %r, through the helper", container, root)
    return backend


async def _wait_for_exec_exit(
    client: docker.APIClient, exec_id: str, container: str, limit: float = 5.0
) -> None:
    """Wait until the helper's exec has ended (its stdin is closed by now)."""
    with trio.move_on_after(limit):
        while True:
            try:
                info = await trio.to_thread.run_sync(client.exec_inspect, exec_id)
            except (docker.errors.APIError, requests.exceptions.RequestException):
                return  # the container or daemon is gone, and the exec with it
            if not info.get("Running"):
                return
            await trio.sleep(0.05)
    logger.warning(
        "helper exec %s in container %r still runs %s s after its stdin was closed",
        exec_id, container, limit,
    )


# Client and container checks.


def _docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or _DEFAULT_DOCKER_HOST


async def _open_client() -> docker.APIClient:
    """Return an API client with the API version negotiated with the daemon."""

    def open_client() -> docker.APIClient:
        return docker.APIClient(version="auto", **docker.utils.kwargs_from_env())

    try:
        return await trio.to_thread.run_sync(open_client)
    except docker.errors.DockerException as exc:
        host = _docker_host()
        if "Permission denied" in str(exc):
            raise ConnectError(
                f"permission denied on the Docker daemon socket at {host}: "
                "add your user to the docker group or run as root"
            ) from exc
        raise ConnectError(
            f"cannot reach the Docker daemon at {host}: is dockerd running? "
            f"Set DOCKER_HOST if it listens elsewhere ({_one_line(exc)})"
        ) from exc


async def _check_container(client: docker.APIClient, container: str) -> None:
    try:
        info = await trio.to_thread.run_sync(client.inspect_container, container)
    except docker.errors.NotFound as exc:
        raise ConnectError(
            f"container {container!r} not found: list running containers with `docker ps`"
        ) from exc
    except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
        raise ConnectError(
            f"cannot inspect container {container!r}: {_one_line(exc)}"
        ) from exc

    state = info.get("State", {})
    if not state.get("Running") or state.get("Paused"):
        status = state.get("Status", "unknown")
        raise ConnectError(
            f"container {container!r} is not running (status {status}): "
            f"start it with `docker start {container}`"
            + (f" or `docker unpause {container}`" if status == "paused" else "")
        )


async def _probe_python(
    client: docker.APIClient, container: str, root: str, user: str | None
) -> bool:
    """Return whether `python3` runs in the container; check `root` with it.

    Runs `python3` directly, without a shell, so that this also works in a
    container that has no `sh`.
    """
    runner = DockerExecRunner(client, container, user)
    try:
        status, stdout, stderr = await runner(["python3", "-c", _PROBE, root], None)
    except BackendError as exc:
        raise ConnectError(f"cannot run a command in container {container!r}: {exc}") from exc

    if status == 0:
        return True
    if status == _PROBE_ROOT_MISSING:
        raise ConnectError(
            f"root directory {root!r} not found in container {container!r}: "
            "give an existing directory after the colon"
        )
    if status == _PROBE_ROOT_NOT_DIRECTORY:
        raise ConnectError(
            f"root {root!r} is not a directory in container {container!r}: give a directory after the colon"
        )
    if status == _EXEC_FAILED and _NOT_FOUND_TEXT in stdout + stderr:
        return False
    # Docker 20.10 sends "unable to find user NAME: ..." on stdout, or, when
    # the hijacked connection is read too late, nothing at all.
    output = stdout + stderr
    if status == _EXEC_FAILED and user is not None and (
        b"unable to find user" in output or not output
    ):
        raise ConnectError(
            f"user {user!r} not found in container {container!r}: "
            "give a user listed in its /etc/passwd, or a numeric uid"
        )
    message = output.decode("utf-8", "replace").strip()
    raise ConnectError(
        f"probe for python3 in container {container!r} failed with exit status "
        f"{status}: {_one_line(message)}"
    )


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


# The exec transport.


async def open_exec(
    client: docker.APIClient,
    container: str,
    argv: list[str],
    user: str | None,
    on_stderr: Callable[[bytes], None],
) -> tuple[ExecSendStream, ExecReceiveStream]:
    """Start `argv` in the container; return its stdin and stdout as trio streams.

    Stderr payloads go to `on_stderr`. Raises `BackendError` with code
    `unavailable` when the container or the daemon is gone.
    """
    exec_id, sock, read_ahead = await _start_exec(client, container, argv, user)
    channel = _ExecChannel(exec_id, trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    return ExecSendStream(channel), ExecReceiveStream(channel, read_ahead, on_stderr)


async def _start_exec(
    client: docker.APIClient, container: str, argv: list[str], user: str | None
) -> tuple[str, socket.socket, bytes]:
    def start() -> tuple[str, socket.socket, bytes]:
        created = client.exec_create(
            container, argv, stdin=True, stdout=True, stderr=True, tty=False,
            user=user or "",
        )
        hijacked = client.exec_start(created["Id"], socket=True)
        sock, read_ahead = _take_socket(hijacked)
        return created["Id"], sock, read_ahead

    try:
        return await trio.to_thread.run_sync(start)
    except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
        raise BackendError(
            "unavailable", "", f"docker exec in {container!r} failed: {_one_line(exc)}"
        ) from exc


def _take_socket(hijacked: object) -> tuple[socket.socket, bytes]:
    """Return a socket of our own for a hijacked exec connection, and the
    bytes that the SDK's HTTP parser already read past the response headers.

    docker-py 7 returns, for unix and plain TCP daemons, the `socket.SocketIO`
    under the HTTP response. The socket is duplicated so that closing the
    SDK's objects (done here) leaves our copy open.
    """
    raw_socket = getattr(hijacked, "_sock", None)
    if not isinstance(raw_socket, socket.socket):
        raise BackendError(
            "not_supported", "",
            f"the Docker connection ({_docker_host()}) is not a plain socket; "
            "use a unix:// or tcp:// DOCKER_HOST without TLS or ssh",
        )

    raw_socket.setblocking(False)
    read_ahead = bytearray()
    response = getattr(hijacked, "_response", None)
    buffered_reader = getattr(getattr(getattr(response, "raw", None), "_fp", None), "fp", None)
    if buffered_reader is not None:
        # A non-blocking raw socket makes read1 return what is buffered,
        # then b"" (or None) once the kernel buffer is empty.
        while chunk := buffered_reader.read1(_RECEIVE_SIZE):
            read_ahead += chunk

    own_socket = socket.socket(fileno=os.dup(raw_socket.fileno()))
    own_socket.setblocking(False)
    if response is not None:
        response.close()
    hijacked.close()
    raw_socket.close()
    return own_socket, bytes(read_ahead)


class _ExecChannel:
    """The socket shared by one exec's send and receive streams; it closes
    when both are closed."""

    def __init__(self, exec_id: str, stream: trio.SocketStream) -> None:
        self.exec_id = exec_id
        self.stream = stream
        self._open_halves = 2

    async def release(self) -> None:
        self._open_halves -= 1
        if self._open_halves == 0:
            await self.stream.aclose()


class ExecSendStream(trio.abc.SendStream):
    """The exec's stdin. `aclose` shuts down the write side, so the program reads EOF."""

    def __init__(self, channel: _ExecChannel) -> None:
        self._channel = channel
        self._closed = False

    @property
    def exec_id(self) -> str:
        return self._channel.exec_id

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the exec's stdin is closed")
        await self._channel.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._channel.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._channel.stream.send_eof()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with trio.CancelScope(shield=True):
                await self._channel.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        await self._channel.release()


class ExecReceiveStream(trio.abc.ReceiveStream):
    """The exec's stdout, taken out of the multiplexed frames.

    Stderr payloads go to `on_stderr`. Stdout payloads are returned as they
    arrive, read straight from the socket into the returned bytes, so a large
    transfer costs no extra copy beyond the frame headers.
    """

    def __init__(
        self,
        channel: _ExecChannel,
        read_ahead: bytes,
        on_stderr: Callable[[bytes], None],
    ) -> None:
        self._channel = channel
        self._buffer = bytearray(read_ahead)
        self._on_stderr = on_stderr
        self._stdout_left = 0
        self._eof = False
        self._closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the exec's stdout is closed")
        limit = max_bytes or _RECEIVE_SIZE
        while not self._eof:
            if self._stdout_left:
                data = await self._take_some(min(self._stdout_left, limit))
                if not data:
                    raise trio.BrokenResourceError("exec output ended inside a frame")
                self._stdout_left -= len(data)
                return data
            await self._read_frame_header()
        return b""

    async def _read_frame_header(self) -> None:
        header = await self._take_exact(_HEADER_SIZE)
        if header is None:
            self._eof = True
            return
        if header[1:4] != b"\0\0\0":
            raise trio.BrokenResourceError(
                f"exec output is not multiplexed (header {header!r}); was a tty allocated?"
            )

        kind = header[0]
        length = int.from_bytes(header[4:8], "big")
        if kind == _STDOUT:
            self._stdout_left = length
            return
        payload = await self._take_exact(length)
        if payload is None:
            raise trio.BrokenResourceError("exec output ended inside a frame")
        if kind in (_STDERR, _SYSTEM_ERROR):
            self._on_stderr(payload)
        else:
            logger.warning("exec %s: ignored a frame of stream type %d", self._channel.exec_id, kind)

    async def _take_some(self, size: int) -> bytes:
        """Return up to `size` bytes (b"" at end of stream), buffer first."""
        if self._buffer:
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
            return data
        return await self._channel.stream.receive_some(size)

    async def _take_exact(self, size: int) -> bytes | None:
        """Return exactly `size` bytes, or None at a clean end of stream."""
        while len(self._buffer) < size:
            chunk = await self._channel.stream.receive_some(max(_RECEIVE_SIZE, size))
            if not chunk:
                if self._buffer:
                    raise trio.BrokenResourceError("exec output ended inside a frame")
                return None
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._channel.release()


class _StderrLogger:
    """Logs an exec's stderr at WARNING, one record per line."""

    # A program that floods stderr must not flood the log.
    max_lines = 1000

    def __init__(self, container: str) -> None:
        self._container = container
        self._partial = bytearray()
        self._lines = 0

    def __call__(self, payload: bytes) -> None:
        self._partial += payload
        *lines, rest = self._partial.split(b"\n")
        self._partial = bytearray(rest)
        if len(self._partial) > _RECEIVE_SIZE:
            lines.append(bytes(self._partial))
            self._partial.clear()
        for line in lines:
            self._log(line)

    def _log(self, line: bytes) -> None:
        self._lines += 1
        if self._lines > self.max_lines:
            return
        text = line.decode("utf-8", "replace").rstrip()
        logger.warning("helper in container %r: %s", self._container, text)
        if self._lines == self.max_lines:
            logger.warning(
                "helper in container %r: further stderr lines are not logged",
                self._container,
            )


# One exec per call, for the shell fallback.


class DockerExecRunner:
    """Runs one command per call with `docker exec`, for `ShellBackend`."""

    # The Engine may report an exec as running for a moment after its
    # output ended; its exit status is polled this many times.
    _exit_polls = 50

    def __init__(self, client: docker.APIClient, container: str, user: str | None) -> None:
        self._client = client
        self._container = container
        self._user = user

    async def __call__(
        self, argv: list[str], stdin: bytes | None
    ) -> tuple[int, bytes, bytes]:
        stderr = bytearray()
        send_stream, receive_stream = await open_exec(
            self._client, self._container, argv, self._user, on_stderr=stderr.extend
        )
        exec_id = send_stream.exec_id
        try:
            stdout = await self._exchange(send_stream, receive_stream, stdin)
        except (trio.BrokenResourceError, OSError) as exc:
            raise BackendError("unavailable", "", f"docker exec stream failed: {exc}") from exc
        finally:
            with trio.CancelScope(shield=True):
                await send_stream.aclose()
                await receive_stream.aclose()

        status = await self._exit_status(exec_id)
        return status, stdout, bytes(stderr)

    async def _exchange(
        self,
        send_stream: ExecSendStream,
        receive_stream: ExecReceiveStream,
        stdin: bytes | None,
    ) -> bytes:
        """Send stdin and read stdout at the same time, so neither side stalls."""

        async def feed() -> None:
            try:
                if stdin:
                    await send_stream.send_all(stdin)
                await send_stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The program ended without reading all of stdin. Its exit
                # status shows whether that was an error.
                pass

        chunks = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            while chunk := await receive_stream.receive_some(1 << 20):
                chunks.append(chunk)
            # Output ends when the program exits, so the rest of stdin has no reader.
            nursery.cancel_scope.cancel()
        return b"".join(chunks)

    async def _exit_status(self, exec_id: str) -> int:
        delay = 0.001
        for _ in range(self._exit_polls):
            try:
                info = await trio.to_thread.run_sync(self._client.exec_inspect, exec_id)
            except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
                raise BackendError("unavailable", "", f"docker exec inspect failed: {exc}") from exc
            if not info.get("Running") and info.get("ExitCode") is not None:
                return info["ExitCode"]
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)
        raise BackendError("timed_out", "", f"exec {exec_id} did not report an exit status")
