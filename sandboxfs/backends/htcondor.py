"""The HTCondor backend: a running job's scratch directory, through the submit node.

`connect_condor` first queries the submit node for the job's state, with one
command (`condor_q`, then `condor_history` when the job has left the queue),
and rejects a job that is not idle or running. It then runs commands in the
job's environment with `condor_ssh_to_job -auto-retry CLUSTER.PROC COMMAND`,
on the submit node through ssh (`SshConnection`, one ControlMaster), or on
this host for `condor://local/...`. condor_ssh_to_job starts the command in
the job's working directory through its own sshd on the execute node.

A first command prints the job's scratch directory (`_CONDOR_SCRATCH_DIR`)
and whether python3 runs there. With python3, the sandboxfs agent runs in one
condor_ssh_to_job that lives as long as the mount. Without it, each operation
is one condor_ssh_to_job (`ShellBackend`), about 0.4 s each.

condor_ssh_to_job sends the command to the execute node's sshd as one string,
and HTCondor's `condor_ssh_to_job_shell_setup` (23.9) runs it with
`eval ${SSH_ORIGINAL_COMMAND}`: the unquoted expansion splits the string at
every run of blanks and newlines and expands glob patterns before bash's eval
parses the rest. So every word of a job command is written as a bash `$'...'`
word in which each byte other than letters, digits and `@%+=:,./_-` is a
`\\xHH` escape (`job_word`); it then has no blank, newline, quote or glob
character for that expansion to change.

Messages of condor_ssh_to_job 23.9 matched here (stderr, exit status 1):
"Unable to fetch job ad; is it still in the queue?", 'The job is on hold:
"REASON".', and "(Use -auto-retry to keep trying periodically.)" for a job
whose execution environment is not ready yet.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
from collections.abc import Sequence

import trio

from sandboxfs.backend import Backend, ConnectError
from sandboxfs.backends.process import (
    Argument,
    CommandPrefix,
    SshConnection,
    connect_process,
    connect_shell,
    last_line,
    run_command,
)
from sandboxfs.sources import SshTarget, check_job_id

logger = logging.getLogger(__name__)

# JobStatus values of HTCondor's job ClassAd.
IDLE, RUNNING, REMOVED, COMPLETED, HELD, TRANSFERRING_OUTPUT, SUSPENDED = range(1, 8)

# Text of condor_ssh_to_job 23.9 for a job that has left the queue, that is
# held, and whose execution environment is not ready yet.
_NOT_IN_QUEUE = "Unable to fetch job ad"
_ON_HOLD = "The job is on hold"
_NOT_READY = ("not yet ready", "Use -auto-retry")

# Seconds between two tries of a job whose environment is not ready yet,
# when condor_ssh_to_job returned despite -auto-retry.
_RETRY_INTERVAL = 1.0
# A shell's "command not found" exit status.
_COMMAND_NOT_FOUND = 127

# Prints "queue<TAB>STATUS<TAB>REASON" from condor_q, or, for a job that has
# left the queue, "history<TAB>STATUS<TAB>REASON" from condor_history, or
# nothing when neither lists the job. $1 is the job id. The job id goes
# before -af, because -af takes every later argument as an attribute.
_STATE_SCRIPT = (
    'queue=$(condor_q "$1" -af:t JobStatus HoldReason) || exit\n'
    'if [ -n "$queue" ]; then printf "queue\\t%s\\n" "$queue"; exit 0; fi\n'
    'history=$(condor_history "$1" -limit 1 -af:t JobStatus RemoveReason) || exit\n'
    'if [ -n "$history" ]; then printf "history\\t%s\\n" "$history"; fi\n'
)

# Prints the job's scratch directory, then "python" when $1 runs there.
_PROBE_SCRIPT = (
    'printf "%s\\n" "${_CONDOR_SCRATCH_DIR:-$(pwd)}"; '
    'if "$1" -I -c "" >/dev/null 2>&1; then echo python; else echo shell; fi'
)

# Prints _WATCH_STARTED, then returns once the job's own processes have
# exited: exit status 0. The starter keeps a job whose program has exited in
# the running state while an ssh session into it stays open, so the agent's
# session would keep the job from ending. The interval is in seconds.
_WATCH_STARTED = b"watching"
_WATCH_SCRIPT = (
    'pid=${_CONDOR_JOB_PIDS%% *}; [ -n "$pid" ] || exit 3; echo watching; '
    'while kill -0 "$pid" 2>/dev/null; do sleep 2; done'
)

# Bytes a bash word may hold without quotes or escapes.
_PLAIN_BYTE = re.compile(rb"[A-Za-z0-9@%+=:,./_-]")
_PLAIN_WORD = re.compile(rb"[A-Za-z0-9@%+=:,./_-]+")


def job_word(argument: Argument) -> bytes:
    """Return `argument` as one bash word that survives the job side's `eval ${...}`.

    Raises ValueError for a NUL byte, which no argv can carry.
    """
    word = argument.encode("utf-8", "surrogateescape") if isinstance(argument, str) else bytes(argument)
    if b"\0" in word:
        raise ValueError(f"argument {argument!r} contains a NUL byte")
    if _PLAIN_WORD.fullmatch(word):
        return word
    escaped = b"".join(bytes([byte]) if _PLAIN_BYTE.fullmatch(bytes([byte])) else b"\\x%02x" % byte for byte in word)
    return b"$'" + escaped + b"'"


class JobPrefix(CommandPrefix):
    """A CommandPrefix whose command runs in a job through condor_ssh_to_job."""

    def argv(self, command: Sequence[Argument]) -> list[Argument]:
        return super().argv([job_word(argument) for argument in command])


@dataclasses.dataclass(frozen=True)
class JobState:
    """A job's JobStatus and the reason HTCondor gives for it, if any."""

    status: int
    reason: str
    in_queue: bool


class _Route:
    """The command prefixes that reach the submit node and the job, and their failure messages."""

    def __init__(self, job: str, ssh: SshConnection | None) -> None:
        self.job = job
        self.ssh = ssh
        self.where = f" on {ssh.label}" if ssh is not None else ""
        job_command = ["condor_ssh_to_job", "-auto-retry", job]
        if ssh is None:
            self.submit = CommandPrefix([], missing_hint="check PATH")
            self.to_job = JobPrefix(job_command, missing_hint="install HTCondor's tools or run where they are")
        else:
            self.submit = ssh.prefix([])
            self.to_job = JobPrefix(self.submit.host, remote=job_command, missing_hint=self.submit.missing_hint)

    def diagnose(self, status: int, stderr: bytes) -> str | None:
        """Return a message when condor_ssh_to_job or ssh failed, None when the command did."""
        text = stderr.decode("utf-8", "replace")
        if _NOT_IN_QUEUE in text:
            return f"HTCondor job {self.job}{self.where} is no longer in the queue: it has finished or was removed"
        if _ON_HOLD in text:
            return f"HTCondor job {self.job}{self.where} is held: {last_line(stderr)}"
        if status == _COMMAND_NOT_FOUND and "condor_ssh_to_job" in last_line(stderr):
            return f"condor_ssh_to_job: command not found{self.where}: install HTCondor's tools there"
        if self.ssh is not None:
            return self.ssh.diagnose(status, stderr)
        return None


async def connect_condor(
    nursery: trio.Nursery,
    job: str,
    subdir: str = "/",
    via_ssh: SshTarget | None = None,
    ssh_command: Sequence[str] = ("ssh",),
    timeout: float = 60.0,
    python: str = "python3",
) -> Backend:
    """Connect to `subdir` of a running HTCondor job's scratch directory.

    `job` is CLUSTER.PROC; `subdir` is relative to the scratch directory
    ("/" is the scratch directory itself). `via_ssh` names the submit node
    when it is not this host; `ssh_command` is the ssh command with its
    options. `timeout` bounds, in seconds, the wait for an idle job to run
    and each step of the connection. `python` is the interpreter tried in the
    job; without it, the shell fallback is used.

    Raises SourceError for an invalid job id or ssh destination. Raises
    ConnectError (one line) when ssh or condor_ssh_to_job fails, or when the
    job is not found, has completed, was removed, is held or suspended, or
    does not run within `timeout`. It is raised too when `subdir` is not a
    directory in the scratch directory.
    """
    check_job_id(job)
    ssh = None
    if via_ssh is not None:
        ssh = SshConnection(via_ssh.host, via_ssh.user, via_ssh.port, ssh_command)
    route = _Route(job, ssh)
    on_close = ssh.aclose if ssh is not None else None
    try:
        state = await query_job_state(route, timeout)
        check_job_state(route, state)
        scratch, has_python = await _probe_job(route, python, state, timeout)
        root = scratch.rstrip("/") + ("" if subdir == "/" else subdir)
        return await _connect_route(nursery, route, root, has_python, python, timeout, on_close)
    except BaseException:
        if ssh is not None:
            await ssh.aclose()
        raise


async def _connect_route(nursery, route, root, has_python, python, timeout, on_close) -> Backend:
    diagnose = route.diagnose
    if has_python:
        watch_scope = trio.CancelScope()

        async def close() -> None:
            watch_scope.cancel()
            if on_close is not None:
                await on_close()

        backend = await connect_process(
            nursery, route.to_job, root, f"directory in HTCondor job {route.job}{route.where}",
            python=python, timeout=timeout, diagnose=diagnose,
            name=f"agent in HTCondor job {route.job}{route.where}", on_close=close,
        )
        # The watch's session starts before the mount, for the reason given at _close_when_job_ends.
        await nursery.start(_close_when_job_ends, route, backend, watch_scope, timeout)
        logger.info("connected to HTCondor job %s%s, root %r, through the agent", route.job, route.where, root)
        return backend

    logger.info("HTCondor job %s%s has no %s: using the shell fallback", route.job, route.where, python)
    return await connect_shell(route.to_job, root, diagnose, timeout, on_close)


async def _close_when_job_ends(
    route: _Route, backend: Backend, scope: trio.CancelScope, timeout: float, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """Close `backend` once the job's processes have exited, so its session ends too.

    Later calls then fail with `unavailable`. Reports started once the watch
    runs in the job. When the job runs on this host (a personal pool), the
    starter gives each condor_ssh_to_job session its own copy of the mount
    namespace. A session that starts after the FUSE mount keeps a copy of it,
    so the kernel would not end the FUSE connection at unmount, and sandboxfs
    would never see the unmount.
    """
    # A session started later, by a reconnect, keeps such a copy too. The
    # mount server then ends itself once its own namespace has lost the mount.
    with scope:
        process = await trio.lowlevel.open_process(
            route.to_job.argv(["sh", "-c", _WATCH_SCRIPT]),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            first_line = b""
            with trio.move_on_after(timeout):
                first_line = await _read_line(process.stdout)
            task_status.started()
            if first_line == _WATCH_STARTED and await process.wait() == 0:
                logger.info("HTCondor job %s%s has ended: closing its agent", route.job, route.where)
                await backend.aclose()
                return
        finally:
            with trio.CancelScope(shield=True):
                await _end_process(process)
        stderr = await _read_all(process.stderr)
        logger.warning(
            "failed to watch HTCondor job %s%s for its end (exit status %s: %s), so the job will not "
            "finish while it is mounted", route.job, route.where, process.returncode, last_line(stderr),
        )


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    """Return the first line of `stream` without its newline; b"" if it ends first."""
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some()
        if not chunk:
            return b""
        data += chunk
    return data.split(b"\n", 1)[0]


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while chunk := await stream.receive_some():
        chunks.append(chunk)
    return b"".join(chunks)


async def _end_process(process: trio.Process) -> None:
    """SIGTERM `process` unless it has exited, then reap it; SIGKILL after 5 s."""
    if process.returncode is None:
        process.terminate()
    with trio.move_on_after(5):
        await process.wait()
        return
    process.kill()
    await process.wait()


# The job's state, from the submit node.


async def query_job_state(route: _Route, timeout: float) -> JobState | None:
    """Return the job's state from condor_q or condor_history, None if neither lists it."""
    with trio.move_on_after(timeout) as scope:
        try:
            status, stdout, stderr = await run_command(route.submit, ["sh", "-c", _STATE_SCRIPT, "sh", route.job])
        except OSError as exc:
            raise route.submit.start_error(exc, ["sh"]) from exc
    if scope.cancelled_caught:
        raise ConnectError(f"condor_q{route.where} did not finish in {timeout} s")

    if status != 0:
        message = route.ssh.diagnose(status, stderr) if route.ssh is not None else None
        if message is None:
            hint = "install HTCondor's tools there" if status == _COMMAND_NOT_FOUND else "check the schedd"
            message = f"condor_q{route.where} failed (exit status {status}): {last_line(stderr)}: {hint}"
        raise ConnectError(message)
    return parse_job_state(stdout)


def parse_job_state(output: bytes) -> JobState | None:
    """Parse the output of _STATE_SCRIPT; raise ConnectError for output it does not expect."""
    line = output.decode("utf-8", "replace").strip()
    if not line:
        return None
    fields = line.split("\t", 2)
    if len(fields) < 2 or fields[0] not in ("queue", "history") or not fields[1].isdigit():
        raise ConnectError(f"unexpected output from condor_q or condor_history: {line!r}")
    reason = fields[2].strip() if len(fields) == 3 else ""
    if reason == "undefined":
        reason = ""
    return JobState(int(fields[1]), reason, fields[0] == "queue")


def check_job_state(route: _Route, state: JobState | None) -> None:
    """Raise ConnectError unless the job is idle or running."""
    job = f"HTCondor job {route.job}{route.where}"
    if state is None:
        raise ConnectError(f"{job} not found: neither condor_q nor condor_history lists it; check the job id")
    if state.status in (IDLE, RUNNING):
        return
    because = f" ({state.reason})" if state.reason else ""
    if state.status == REMOVED:
        raise ConnectError(f"{job} was removed{because}: its scratch directory is gone")
    if state.status in (COMPLETED, TRANSFERRING_OUTPUT):
        raise ConnectError(f"{job} has completed: its scratch directory is gone; mount a running job")
    if state.status == HELD:
        raise ConnectError(f"{job} is held{because}: release it with `condor_release {route.job}`, then mount again")
    if state.status == SUSPENDED:
        raise ConnectError(f"{job} is suspended: mount it once it runs again")
    raise ConnectError(f"{job} has JobStatus {state.status}, which is not running")


# The job's environment.


async def _probe_job(route: _Route, python: str, state: JobState, timeout: float) -> tuple[str, bool]:
    """Return the job's scratch directory and whether `python` runs in the job.

    condor_ssh_to_job -auto-retry waits while the job is idle or its
    environment is being set up; this waits at most `timeout` seconds.
    """
    with trio.move_on_after(timeout) as scope:
        while True:
            status, stdout, stderr = await _run_in_job(route, ["sh", "-c", _PROBE_SCRIPT, "sh", python])
            if status == 0 or not any(text in stderr.decode("utf-8", "replace") for text in _NOT_READY):
                break
            logger.info("HTCondor job %s%s is not ready yet; trying again", route.job, route.where)
            await trio.sleep(_RETRY_INTERVAL)
    if scope.cancelled_caught:
        what = "idle" if state.status == IDLE else "running, but its environment is not ready"
        raise ConnectError(
            f"HTCondor job {route.job}{route.where} was not ready within {timeout} s (it was {what}); "
            "check it with `condor_q -better-analyze`"
        )

    if status != 0:
        message = route.diagnose(status, stderr)
        raise ConnectError(message or f"condor_ssh_to_job {route.job}{route.where} failed: {last_line(stderr)}")
    lines = stdout.decode("utf-8", "surrogateescape").splitlines()
    if len(lines) != 2 or not lines[0].startswith("/"):
        raise ConnectError(f"unexpected output from a command in HTCondor job {route.job}{route.where}: {lines!r}")
    return lines[0], lines[1] == "python"


async def _run_in_job(route: _Route, command: Sequence[Argument]) -> tuple[int, bytes, bytes]:
    try:
        return await run_command(route.to_job, command)
    except OSError as exc:
        raise route.to_job.start_error(exc, command) from exc
