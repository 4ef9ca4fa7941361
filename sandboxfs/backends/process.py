"""Reaching a sandbox through a command run as a host subprocess.

A `CommandPrefix` is the host command that runs an argv inside a sandbox:
`apptainer exec instance://NAME`, `ssh HOST apptainer exec ...`, or nothing
at all for a host directory. On top of it:

- `connect_process` starts the sandboxfs agent (`sandboxfs.remote`) through
  the prefix, with pipes for stdin and stdout, and returns its backend;
- `ProcessRunner` runs one argv per call through the prefix, for
  `ShellBackend` (the shell fallback) in sandboxes without python3;
- `probe_python` decides between the two;
- `SshConnection` and `remote_command` reach the sandbox through ssh.

ssh sends its command to the remote host as ONE string, which the user's
login shell there splits into words. So a prefix with a `remote` part quotes
each word for a POSIX shell (`quote_argument`) and passes the joined string
as one argument to ssh.

A failed command is handed to a `Diagnose` function of the route. It
separates failures of the route (no such instance, ssh refused) from
failures of the command itself, and turns the former into a one-line message.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Sequence

import trio

from sandboxfs.backend import Backend, BackendError, ConnectError
from sandboxfs.backends.shell import ShellBackend
from sandboxfs.remote import agent_command, connect
from sandboxfs.sources import check_ssh_host, check_ssh_user

logger = logging.getLogger(__name__)

# An argument on a command line: text, or bytes that need not be UTF-8.
Argument = str | bytes

# (exit status, stderr) of a failed command -> a one-line message when the
# route to the sandbox failed, None when the command itself failed.
Diagnose = Callable[[int, bytes], str | None]

# Seconds the agent gets to exit after its stdin closes, and again after
# SIGTERM, before it is killed.
STOP_GRACE = 2.0

# Lines of the agent's stderr kept for error messages, and logged at most.
_STDERR_TAIL_LINES = 20
_MAX_LOGGED_STDERR_LINES = 200

# The program the probe runs: it only has to start.
_PROBE_PROGRAM = "import sys; sys.exit(0)"


class CommandPrefix:
    """The host command that runs an argv in a sandbox.

    `host` runs on the host, and the argv is appended to it. When `remote`
    is given, `host` ends with an ssh destination: `remote` plus the argv
    become one shell-quoted string, the command that ssh sends. `missing_hint`
    is the advice given when `host[0]` is not found on the host.
    """

    def __init__(
        self,
        host: Sequence[str],
        remote: Sequence[Argument] | None = None,
        missing_hint: str = "check the command and PATH",
    ) -> None:
        self.host = list(host)
        self.remote = None if remote is None else list(remote)
        self.missing_hint = missing_hint

    def argv(self, command: Sequence[Argument]) -> list[Argument]:
        """Return the host argv that runs `command` in the sandbox."""
        if self.remote is None:
            return [*self.host, *command]
        return [*self.host, remote_command([*self.remote, *command])]

    def start_error(self, exc: OSError, command: Sequence[Argument]) -> ConnectError:
        """Return the ConnectError for a host command that could not start."""
        program = os.fsdecode(self.host[0] if self.host else command[0])
        if isinstance(exc, FileNotFoundError):
            return ConnectError(f"{program}: command not found: {self.missing_hint}")
        return ConnectError(f"cannot run {program}: {exc.strerror or exc}")


def as_prefix(prefix: CommandPrefix | Sequence[str]) -> CommandPrefix:
    """Return `prefix` as a CommandPrefix; a list of words is a plain prefix."""
    if isinstance(prefix, CommandPrefix):
        return prefix
    return CommandPrefix(prefix)


# Quoting for the remote shell.

# Words made only of these bytes need no quotes in a POSIX shell.
_SAFE_WORD = re.compile(rb"[A-Za-z0-9@%+=:,./_-]+")


def quote_argument(argument: Argument) -> bytes:
    """Quote one word for a POSIX shell, byte for byte.

    Text is encoded as `os.fsencode` does, so names that are not UTF-8 (held
    in a str with surrogate escapes) get their original bytes back. Inside
    single quotes every byte but the quote itself is literal, newlines
    included; a quote becomes `'"'"'`. Raises ValueError for a NUL byte,
    which no argv can carry.
    """
    word = os.fsencode(argument)
    if b"\0" in word:
        raise ValueError(f"argument {argument!r} contains a NUL byte")
    if _SAFE_WORD.fullmatch(word):
        return word
    return b"'" + word.replace(b"'", b"'\"'\"'") + b"'"


def remote_command(argv: Sequence[Argument]) -> bytes:
    """Return `argv` as one command string that a POSIX shell splits back.

    NOTE: this assumes the remote login shell is a POSIX shell (sh, bash,
    dash, zsh, ksh). csh and fish quote differently.
    """
    if not argv:
        raise ValueError("empty command")
    return b" ".join(quote_argument(argument) for argument in argv)


# ssh.

# Seconds an idle ControlMaster connection stays open after its last client.
SSH_CONTROL_PERSIST = 60

# Hints for ssh's own error messages, matched in the last line of stderr.
_SSH_HINTS = (
    ("Permission denied", "check your ssh key and config (BatchMode is on, so ssh asks for no password)"),
    ("Host key verification failed", "add the host's key to known_hosts, for example by connecting once with ssh"),
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "check the host's key in known_hosts"),
    ("Connection refused", "check that sshd runs on that host and port"),
    ("Could not resolve hostname", "check the host name"),
    ("Connection timed out", "check the host, the port and the network"),
    ("No route to host", "check the host and the network"),
)


def ssh_destination(user: str | None, host: str) -> str:
    """Return `[USER@]HOST` after checking both parts; raise SourceError."""
    check_ssh_host(host)
    if user is None:
        return host
    check_ssh_user(user)
    return f"{user}@{host}"


def ssh_prefix(
    destination: str,
    port: int | None,
    ssh_command: Sequence[str],
    control_path: str,
) -> list[str]:
    """Return the ssh argv that runs a command string on `destination`.

    ssh shares one connection between its calls through a ControlMaster at
    `control_path`, so that the shell fallback's per-call ssh does not
    authenticate each time. `-e none` keeps ssh from reading `~.` in the
    binary stream on stdin as an escape. Options in `ssh_command` come first,
    and ssh keeps the first value it gets for an option, so the user's win.
    """
    user, at, host = destination.rpartition("@")
    ssh_destination(user if at else None, host)
    argv = [
        *ssh_command,
        "-T",
        "-e", "none",
        "-o", "BatchMode=yes",
        "-o", "ControlMaster=auto",
        "-o", f"ControlPath={control_path}",
        "-o", f"ControlPersist={SSH_CONTROL_PERSIST}",
    ]
    if port is not None:
        argv += ["-p", str(port)]
    return argv + ["--", destination]


class SshConnection:
    """An ssh route to one host, with its ControlMaster socket.

    `aclose` stops the master and removes its directory; it may be called
    more than once.
    """

    def __init__(
        self,
        host: str,
        user: str | None = None,
        port: int | None = None,
        ssh_command: Sequence[str] = ("ssh",),
    ) -> None:
        if not ssh_command:
            raise ValueError("empty ssh command")
        self.destination = ssh_destination(user, host)
        self.port = port
        self.ssh_command = list(ssh_command)
        self.label = self.destination + (f":{port}" if port is not None else "")
        # A private directory, so no other user can put a socket there.
        self._control_dir: str | None = tempfile.mkdtemp(prefix="sandboxfs-ssh-")
        self.control_path = os.path.join(self._control_dir, "control")

    def prefix(self, remote: Sequence[Argument]) -> CommandPrefix:
        """Return the prefix that runs `remote` + argv on the host through ssh."""
        host = ssh_prefix(self.destination, self.port, self.ssh_command, self.control_path)
        return CommandPrefix(
            host,
            remote=remote,
            missing_hint="install the OpenSSH client or give the ssh command with --ssh-command",
        )

    def diagnose(self, status: int, stderr: bytes) -> str | None:
        """Return a message for a failure of ssh itself (exit status 255)."""
        if status != 255:
            return None
        line = last_line(stderr)
        # Apptainer's fatal errors also exit with 255; they are not ssh's.
        if not line or line.startswith("FATAL:"):
            return None
        hint = "check the host and your ssh config"
        for text, text_hint in _SSH_HINTS:
            if text in line:
                hint = text_hint
                break
        return f"ssh to {self.label} failed: {line.rstrip('.')}: {hint}"

    async def aclose(self) -> None:
        """Stop the ControlMaster, if one runs, and remove its directory."""
        if self._control_dir is None:
            return
        control_dir, self._control_dir = self._control_dir, None
        with trio.CancelScope(shield=True):
            if os.path.exists(self.control_path):
                await self._stop_master()
            shutil.rmtree(control_dir, ignore_errors=True)

    async def _stop_master(self) -> None:
        argv = [*self.ssh_command, "-o", f"ControlPath={self.control_path}", "-O", "exit", "--", self.destination]
        with trio.move_on_after(STOP_GRACE):
            try:
                result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
            except OSError as exc:
                logger.warning("failed to stop the ssh connection to %s: %s", self.label, exc)
                return
            if result.returncode != 0:
                logger.warning(
                    "failed to stop the ssh connection to %s: %s", self.label, last_line(result.stderr)
                )


def last_line(output: bytes) -> str:
    """Return the last non-empty line of a command's output, as text."""
    for line in reversed(output.splitlines()):
        text = line.decode("utf-8", "replace").strip()
        if text:
            return text
    return ""


# Running one command.


async def run_command(
    prefix: CommandPrefix, command: Sequence[Argument], stdin: bytes | None = None
) -> tuple[int, bytes, bytes]:
    """Run `command` in the sandbox; return (exit status, stdout, stderr).

    Raises OSError when the host command cannot be started. When the caller
    is cancelled, trio terminates the process, then kills it.
    """
    result = await trio.run_process(
        prefix.argv(command),
        stdin=stdin or b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


class ProcessRunner:
    """Runs one command per call through a prefix, for `ShellBackend`.

    A failure that `diagnose` attributes to the route raises BackendError
    with code `unavailable`, as the runner contract of `ShellBackend` requires.
    """

    def __init__(self, prefix: CommandPrefix | Sequence[str], diagnose: Diagnose | None = None) -> None:
        self._prefix = as_prefix(prefix)
        self._diagnose = diagnose

    async def __call__(self, argv: list[str], stdin: bytes | None) -> tuple[int, bytes, bytes]:
        try:
            status, stdout, stderr = await run_command(self._prefix, argv, stdin)
        except OSError as exc:
            raise BackendError("unavailable", "", str(self._prefix.start_error(exc, argv))) from exc
        if status != 0 and self._diagnose is not None:
            message = self._diagnose(status, stderr)
            if message is not None:
                raise BackendError("unavailable", "", message)
        return status, stdout, stderr


async def probe_python(
    prefix: CommandPrefix,
    python: str = "python3",
    diagnose: Diagnose | None = None,
    timeout: float | None = 60.0,
) -> bool:
    """Return whether `python` runs in the sandbox.

    Raises ConnectError when the host command is missing, when `diagnose`
    finds that the route failed, or when the probe takes over `timeout`
    seconds. Any other failure means no usable python: the caller falls
    back to the shell, whose start reports what remains wrong.
    """
    with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
        try:
            status, _, stderr = await run_command(prefix, [python, "-c", _PROBE_PROGRAM])
        except OSError as exc:
            raise prefix.start_error(exc, [python]) from exc
    if scope.cancelled_caught:
        raise ConnectError(f"no reply from the sandbox in {timeout} s: `{python} -c ...` did not finish")

    if status == 0:
        return True
    message = diagnose(status, stderr) if diagnose is not None else None
    if message is not None:
        raise ConnectError(message)
    logger.info("%s does not run in the sandbox (exit status %d): %s", python, status, last_line(stderr))
    return False


# The shell fallback.


class _ProcessShellBackend(ShellBackend):
    """A ShellBackend that runs `on_close` once when it is closed."""

    def __init__(
        self,
        runner: ProcessRunner,
        root: str,
        timeout: float,
        on_close: Callable[[], Awaitable[None]] | None,
    ) -> None:
        super().__init__(runner, root, timeout=timeout)
        self._on_close = on_close

    async def aclose(self) -> None:
        await super().aclose()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            with trio.CancelScope(shield=True):
                await on_close()


async def connect_shell(
    prefix: CommandPrefix | Sequence[str],
    root: str,
    diagnose: Diagnose | None = None,
    timeout: float = 60.0,
    on_close: Callable[[], Awaitable[None]] | None = None,
) -> Backend:
    """Return a started `ShellBackend` that runs each operation through `prefix`.

    Raises ConnectError as `ShellBackend.start` does; `on_close` runs then too.
    """
    backend = _ProcessShellBackend(ProcessRunner(prefix, diagnose), root, timeout, on_close)
    try:
        await backend.start()
    except BaseException:
        await backend.aclose()
        raise
    return backend


# The agent.


async def connect_process(
    nursery: trio.Nursery,
    prefix: CommandPrefix | Sequence[str],
    root: str,
    label: str,
    python: str = "python3",
    timeout: float | None = 60.0,
    diagnose: Diagnose | None = None,
    name: str = "agent",
    on_close: Callable[[], Awaitable[None]] | None = None,
) -> Backend:
    """Start the agent through `prefix` and return its backend for `root`.

    `label` names the root in error messages ("directory in apptainer
    instance 'x'"); `name` names the agent process in the log. The agent's
    stderr is logged line by line at WARNING. The process runs until the
    backend is closed or `nursery` is cancelled, and is reaped either way;
    `on_close` runs after it has exited.

    Raises ConnectError when the host command cannot start, when the agent
    does not start (with the reason from its stderr when there is one) or
    when `root` is not an existing directory.
    """
    prefix = as_prefix(prefix)
    try:
        process = await trio.lowlevel.open_process(
            prefix.argv(agent_command(python)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        if on_close is not None:
            with trio.CancelScope(shield=True):
                await on_close()
        raise prefix.start_error(exc, [python]) from exc

    stopped = False

    async def stop() -> None:
        # Runs when the backend is closed, and when the nursery is cancelled
        # first; `on_close` runs once either way.
        nonlocal stopped
        await stop_process(process, name)
        if not stopped and on_close is not None:
            stopped = True
            with trio.CancelScope(shield=True):
                await on_close()

    stderr = _StderrLog(name, process.pid)
    nursery.start_soon(stderr.read, process.stderr)
    nursery.start_soon(_supervise, process, name, stop)

    try:
        return await connect(
            process.stdin, process.stdout, nursery, root, timeout=timeout, root_label=label, on_close=stop
        )
    except ConnectError as exc:
        raise await _agent_start_error(exc, process, stderr, diagnose) from exc


async def _agent_start_error(
    exc: ConnectError, process: trio.Process, stderr: _StderrLog, diagnose: Diagnose | None
) -> ConnectError:
    """Return the ConnectError for an agent that did not start, from its stderr."""
    # `connect` closed the backend, so the process has been reaped. Status 0
    # means the agent ran and `connect` rejected the root.
    if not process.returncode:
        return exc
    with trio.move_on_after(STOP_GRACE):
        await stderr.done.wait()
    output = stderr.output()
    message = diagnose(process.returncode, output) if diagnose is not None else None
    if message is not None:
        return ConnectError(message)
    if output.strip():
        return ConnectError(f"{exc} (exit status {process.returncode}: {last_line(output)})")
    return exc


class _StderrLog:
    """Logs a process's stderr line by line and keeps its last lines."""

    def __init__(self, name: str, pid: int) -> None:
        self._name = name
        self._pid = pid
        self._tail: collections.deque[bytes] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._logged = 0
        self.done = trio.Event()

    async def read(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        try:
            while chunk := await stream.receive_some():
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._add(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if pending:
                self._add(pending)
            self.done.set()

    def output(self) -> bytes:
        return b"\n".join(self._tail)

    def _add(self, line: bytes) -> None:
        self._tail.append(line)
        self._logged += 1
        if self._logged <= _MAX_LOGGED_STDERR_LINES:
            logger.warning("%s (pid %d): %s", self._name, self._pid, line.decode("utf-8", "backslashreplace"))
        elif self._logged == _MAX_LOGGED_STDERR_LINES + 1:
            logger.warning("%s (pid %d): further stderr lines are not logged", self._name, self._pid)


async def _supervise(process: trio.Process, name: str, stop: Callable[[], Awaitable[None]]) -> None:
    """Wait for the agent to exit; stop it if the nursery is cancelled first."""
    try:
        status = await process.wait()
    finally:
        await stop()
    if status != 0:
        logger.warning("%s (pid %d) exited with status %d", name, process.pid, status)
    else:
        logger.info("%s (pid %d) exited", name, process.pid)


async def stop_process(process: trio.Process, name: str) -> None:
    """Close the process's stdin, then SIGTERM and SIGKILL it until it is reaped."""
    with trio.CancelScope(shield=True):
        if process.stdin is not None:
            await process.stdin.aclose()
        with trio.move_on_after(STOP_GRACE):
            await process.wait()
            return
        logger.warning("%s (pid %d) did not exit; sending SIGTERM", name, process.pid)
        process.terminate()
        with trio.move_on_after(STOP_GRACE):
            await process.wait()
            return
        logger.warning("%s (pid %d) ignored SIGTERM; sending SIGKILL", name, process.pid)
        process.kill()
        await process.wait()
