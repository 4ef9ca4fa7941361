"""The sandboxfs agent, started inside a sandbox, and the host's client for it.

A backend starts ``python3 -c BOOTSTRAP`` in the sandbox with pipes for stdin
and stdout, then calls `connect` with the two ends. `connect` sends the agent
source (`agent_source`) as BOOTSTRAP expects it, starts the reply reader and
returns an `AgentBackend`. The wire format is described in
``sandboxfs/remote/agent.py``.
"""

from __future__ import annotations

import importlib.resources
import logging
import struct
from collections.abc import Awaitable, Callable

import trio

from sandboxfs.backend import BackendError, ConnectError
from sandboxfs.remote.agent_backend import AgentBackend
from sandboxfs.remote.channel import Channel

__all__ = [
    "BOOTSTRAP",
    "AgentBackend",
    "Channel",
    "agent_command",
    "agent_source",
    "connect",
]

logger = logging.getLogger(__name__)

# The program given to `python3 -c`. It reads an 8-byte big-endian length
# and that many bytes of source from fd 0 with os.read, so it consumes no
# byte of the requests that follow, then runs the source as __main__. It has
# no newline, because some routes (condor_ssh_to_job) flatten newlines in
# arguments, and no single quote or `$`, so it fits in single quotes in a
# shell command. The `\n` below are escapes inside a string literal.
BOOTSTRAP = (
    "import os,struct;"
    'exec("def _read(n):\\n'
    " b=bytearray()\\n"
    " while len(b)<n:\\n"
    "  c=os.read(0,n-len(b))\\n"
    "  if not c:raise SystemExit(3)\\n"
    "  b+=c\\n"
    ' return bytes(b)");'
    'exec(compile(_read(struct.unpack(">Q",_read(8))[0]),"sandboxfs-agent","exec"),'
    '{"__name__":"__main__"})'
)


def agent_source() -> bytes:
    """Return the source of the agent program."""
    return (
        importlib.resources.files("sandboxfs.remote")
        .joinpath("agent.py")
        .read_bytes()
    )


def bootstrap_input() -> bytes:
    """Return what BOOTSTRAP reads from stdin: the length, then the source."""
    source = agent_source()
    return struct.pack(">Q", len(source)) + source


async def connect(
    send_stream: trio.abc.SendStream,
    receive_stream: trio.abc.ReceiveStream,
    nursery: trio.Nursery,
    root: str,
    timeout: float | None = 60.0,
    root_label: str = "sandbox directory",
    on_close: Callable[[], Awaitable[None]] | None = None,
) -> AgentBackend:
    """Start the agent over a fresh `python3 -c BOOTSTRAP` and return its backend.

    `send_stream` and `receive_stream` are the process's stdin and stdout.
    The reply reader runs in `nursery` until the backend is closed or the
    stream ends. `root_label` names the root in error messages ("local
    directory", "directory in container c1"). `on_close` runs when the
    backend is closed, after its streams; use it to stop the process.

    Raises ConnectError if the agent sends no reply to its first request or if
    `root` is not an existing directory. The backend is closed then.
    """
    channel = Channel(send_stream, receive_stream, timeout=timeout)
    backend = AgentBackend(channel, on_close=on_close)
    try:
        if not root.startswith("/"):
            raise ConnectError(f"{root_label} {root!r} is not an absolute path")
        channel.send_raw(bootstrap_input())
        nursery.start_soon(channel.serve)
        await _say_hello(backend, root)
        await _check_root(backend, root, root_label)
    except BaseException:
        with trio.CancelScope(shield=True):
            await backend.aclose()
        raise
    backend.root = root
    logger.info(
        "agent started: pid %s, uid %d, gid %d, python %s",
        backend.hello_info.get("pid"),
        backend.identity.uid,
        backend.identity.gid,
        backend.hello_info.get("python"),
    )
    return backend


async def _say_hello(backend: AgentBackend, root: str) -> None:
    try:
        await backend.hello(root)
    except BackendError as exc:
        raise ConnectError(
            f"the sandboxfs agent did not start ({exc}): "
            "check that python3 3.6 or newer runs in the sandbox"
        ) from exc


async def _check_root(backend: AgentBackend, root: str, root_label: str) -> None:
    try:
        st = await backend.stat(root, follow=True)
    except BackendError as exc:
        if exc.code in ("file_not_found", "not_a_directory"):
            raise ConnectError(
                f"{root_label} {root!r} does not exist: create it or check the path"
            ) from exc
        raise ConnectError(
            f"cannot access {root_label} {root!r}: {exc.code}"
            + (f" ({exc.message})" if exc.message else "")
        ) from exc
    if not st.is_dir:
        raise ConnectError(
            f"{root_label} {root!r} is not a directory: give a directory to mount"
        )


def agent_command(python: str = "python3") -> list[str]:
    """Return the command that starts the agent with interpreter `python`.

    -I (isolated mode) keeps PYTHONPATH, user site-packages and the current
    directory out of sys.path, so files in the sandbox cannot replace the
    standard modules the agent imports.
    """
    return [python, "-I", "-c", BOOTSTRAP]
