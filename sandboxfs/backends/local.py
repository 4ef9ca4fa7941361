"""The `local` backend: a host directory, served by the agent as a subprocess.

It runs the same agent program as the sandbox backends, so tests of this
backend exercise the agent and its wire protocol without a container.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import trio

from sandboxfs.backend import Backend, ConnectError
from sandboxfs.remote import agent_command, connect

logger = logging.getLogger(__name__)

# Seconds the agent gets to exit after its stdin closes, and again after
# SIGTERM, before it is killed.
STOP_GRACE = 2.0


async def connect_local(
    nursery: trio.Nursery,
    root: str,
    python: str | None = None,
    timeout: float | None = 60.0,
) -> Backend:
    """Start the agent on the host and return a backend for directory `root`.

    `python` is the interpreter that runs the agent (default: the current
    one). The agent process runs until the backend is closed or `nursery`
    is cancelled, and is reaped either way.

    Raises ConnectError if `root` is not an existing directory or the agent
    does not start.
    """
    root = os.path.abspath(root)
    label = "local directory"
    if not os.path.exists(root):
        raise ConnectError(f"{label} {root!r} does not exist: create it or check the path")
    if not os.path.isdir(root):
        raise ConnectError(f"{label} {root!r} is not a directory: give a directory to mount")

    command = agent_command(python or sys.executable)
    try:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
    except OSError as exc:
        raise ConnectError(
            f"failed to start the local agent with {command[0]!r}: {exc}"
        ) from exc
    nursery.start_soon(_supervise, process)

    async def stop() -> None:
        await _stop_process(process)

    return await connect(
        process.stdin,
        process.stdout,
        nursery,
        root,
        timeout=timeout,
        root_label=label,
        on_close=stop,
    )


async def _supervise(process: trio.Process) -> None:
    """Wait for the agent to exit; stop it if the nursery is cancelled first."""
    try:
        status = await process.wait()
    finally:
        await _stop_process(process)
    if status != 0:
        logger.warning("local agent (pid %d) exited with status %d", process.pid, status)
    else:
        logger.info("local agent (pid %d) exited", process.pid)


async def _stop_process(process: trio.Process) -> None:
    """Close the agent's stdin, then SIGTERM and SIGKILL it until it is reaped."""
    with trio.CancelScope(shield=True):
        if process.stdin is not None:
            await process.stdin.aclose()
        with trio.move_on_after(STOP_GRACE):
            await process.wait()
            return
        logger.warning("local agent (pid %d) did not exit; sending SIGTERM", process.pid)
        process.terminate()
        with trio.move_on_after(STOP_GRACE):
            await process.wait()
            return
        logger.warning("local agent (pid %d) ignored SIGTERM; sending SIGKILL", process.pid)
        process.kill()
        await process.wait()
