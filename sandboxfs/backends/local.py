"""The `local` backend: a host directory, served by the agent as a subprocess.

It runs the same agent program as the sandbox backends, so tests of this
backend exercise the agent and its wire protocol without a container.
"""

from __future__ import annotations

import os
import sys

import trio

from sandboxfs.backend import Backend, ConnectError
from sandboxfs.backends.process import CommandPrefix, connect_process


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

    python = python or sys.executable
    # An empty prefix: the agent's own command runs on the host.
    prefix = CommandPrefix([], missing_hint=f"give an existing Python interpreter, not {python!r}")
    return await connect_process(
        nursery, prefix, root, label, python=python, timeout=timeout, name="local agent"
    )
