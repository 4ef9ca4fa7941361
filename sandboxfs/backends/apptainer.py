"""The Apptainer backend: an instance reached with `apptainer exec instance://NAME`.

`connect_apptainer` runs `apptainer exec instance://NAME python3 -c ...` once
to see whether the instance has python3. If it has, the sandboxfs agent runs
in one `apptainer exec` that lives as long as the mount; otherwise each
operation is one `apptainer exec ... sh -c SCRIPT` (`ShellBackend`).

With `via_ssh`, apptainer runs on another host: every command goes through
ssh (`SshConnection`), sharing one ssh connection.

Apptainer 1.4 reports a missing instance on stderr with exit status 255:
"FATAL:   While setting image/instance: no instance found with name NAME"
(internal/pkg/instance and the launcher in Apptainer's source).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import trio

from sandboxfs.backend import Backend
from sandboxfs.backends.process import (
    CommandPrefix,
    SshConnection,
    connect_process,
    connect_shell,
    last_line,
    probe_python,
)
from sandboxfs.sources import SshTarget, check_instance_name

logger = logging.getLogger(__name__)

_INSTANCE_NOT_FOUND = "no instance found with name"
_INVALID_NAME = "is not a valid instance name"
# A shell's "command not found" exit status.
_COMMAND_NOT_FOUND = 127


async def connect_apptainer(
    nursery: trio.Nursery,
    instance: str,
    root: str = "/",
    via_ssh: SshTarget | None = None,
    apptainer: str = "apptainer",
    ssh_command: Sequence[str] = ("ssh",),
    python: str = "python3",
    timeout: float = 60.0,
) -> Backend:
    """Connect to `root` in a running Apptainer instance and return its backend.

    `apptainer` is the apptainer command on the host that runs the instance.
    `via_ssh` names that host when it is not this one; `ssh_command` is the
    ssh command with its options. `python` is the interpreter tried in the
    instance; without it, the shell fallback is used.

    Raises SourceError for an invalid instance name or ssh destination, and
    ConnectError (one line, with what to do) when apptainer or ssh is not
    found, ssh fails, the instance is not running, or `root` is missing or
    not a directory.
    """
    check_instance_name(instance)
    exec_argv = [apptainer, "exec", f"instance://{instance}"]
    ssh = None
    if via_ssh is None:
        prefix = CommandPrefix(exec_argv, missing_hint="install Apptainer or give its path with --apptainer")
        where = ""
    else:
        ssh = SshConnection(via_ssh.host, via_ssh.user, via_ssh.port, ssh_command)
        prefix = ssh.prefix(exec_argv)
        where = f" on {ssh.label}"

    diagnose = functools.partial(_diagnose, instance, apptainer, where, ssh)
    label = f"directory in apptainer instance {instance!r}{where}"
    on_close = ssh.aclose if ssh is not None else None
    try:
        if await probe_python(prefix, python, diagnose, timeout):
            backend = await connect_process(
                nursery, prefix, root, label, python=python, timeout=timeout,
                diagnose=diagnose, name=f"agent in apptainer instance {instance!r}{where}",
                on_close=on_close,
            )
            logger.info("connected to apptainer instance %r%s, root %r, through the agent", instance, where, root)
            return backend

        logger.info("apptainer instance %r%s has no %s: using the shell fallback", instance, where, python)
        return await connect_shell(prefix, root, diagnose, timeout, on_close)
    except BaseException:
        if ssh is not None:
            await ssh.aclose()
        raise


def _diagnose(
    instance: str, apptainer: str, where: str, ssh: SshConnection | None, status: int, stderr: bytes
) -> str | None:
    """Return a message when apptainer or ssh failed, None when the command did."""
    text = stderr.decode("utf-8", "replace")
    if _INSTANCE_NOT_FOUND in text:
        return (
            f"apptainer instance {instance!r} not found{where}: list running instances "
            f"with `apptainer instance list`, or start it with `apptainer instance start IMAGE {instance}`"
        )
    if _INVALID_NAME in text:
        return f"apptainer rejected the instance name {instance!r}: {last_line(stderr)}"
    if ssh is not None:
        if status == _COMMAND_NOT_FOUND and _is_missing_command(apptainer, last_line(stderr)):
            return (
                f"{apptainer}: command not found{where}: install Apptainer there "
                "or give its path with --apptainer"
            )
        return ssh.diagnose(status, stderr)
    return None


def _is_missing_command(command: str, line: str) -> bool:
    """Return whether a shell's error line reports that `command` was not found.

    bash prints "bash: line 1: CMD: command not found" (or "No such file or
    directory" for a path), dash "sh: 1: CMD: not found", zsh "zsh:1:
    command not found: CMD".
    """
    endings = (f"{command}: command not found", f"{command}: not found", f"{command}: No such file or directory")
    return line.endswith(endings) or line.endswith(f"command not found: {command}")
