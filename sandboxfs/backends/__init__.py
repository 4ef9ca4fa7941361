"""Backends: how to reach each kind of sandbox.

`open_backend` connects to the sandbox a `Source` names and returns a
connected `Backend`, whose background tasks run in the given nursery.
"""

from __future__ import annotations

import trio

from ..backend import Backend, ConnectError
from ..sources import Source


async def open_backend(nursery: trio.Nursery, source: Source, timeout: float = 60.0) -> Backend:
    """Connect to a sandbox; raise ConnectError with a one-line message.

    `timeout` bounds, in seconds, the wait for each reply from the sandbox.
    """
    if source.scheme == "local":
        from .local import connect_local

        return await connect_local(nursery, source.root, timeout=timeout)
    if source.scheme == "docker":
        from .docker import connect_docker

        return await connect_docker(nursery, source.target, root=source.root, user=source.user, timeout=timeout)
    if source.scheme == "apptainer":
        from .apptainer import connect_apptainer

        return await connect_apptainer(
            nursery,
            source.target,
            root=source.root,
            via_ssh=source.via,
            apptainer=source.commands.apptainer,
            ssh_command=source.commands.ssh,
            timeout=timeout,
        )
    if source.scheme == "condor":
        from .htcondor import connect_condor

        return await connect_condor(
            nursery,
            source.target,
            subdir=source.root,
            via_ssh=source.via,
            ssh_command=source.commands.ssh,
            timeout=timeout,
        )
    raise ConnectError(f"unknown source type {source.scheme!r}")
