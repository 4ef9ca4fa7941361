"""Start and remove HTCondor sandbox jobs: `sandboxfs condor submit` and `rm`.

A sandbox job is a vanilla-universe job whose executable is `/bin/sh` with a
one-line script in its arguments. The script writes the embedded files into
the job's scratch directory, links the shared ones there, then sleeps for
the requested duration so that the scratch directory can be mounted with
`sandboxfs mount condor://...`. It exits 0 when the duration ends or on
SIGTERM (which `condor_rm` sends).

Files reach the job in one of three ways (`plan_staging` picks them):

- embed: the name and content travel base64-encoded in the job's arguments;
- transfer: the files are copied with tar over ssh into `input/` of a job
  directory on the submit node, sent with `transfer_input_files = input/`;
- shared: the files already sit on a filesystem that the submit and execute
  nodes share (the `--shared-dir`), and are used in place.

Every command on the submit node is an argv. On the ssh route each word is
quoted for the remote shell (`remote_command`), so file names with spaces
or quotes reach the commands unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import logging
import os
import re
import secrets
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from typing import BinaryIO

import trio

from sandboxfs.backends.process import Argument, SshConnection, last_line
from sandboxfs.sources import SourceError, check_ssh_host, check_ssh_user

logger = logging.getLogger(__name__)

# A file is embedded when it is under EMBED_MAX_FILE bytes and the embedded
# files stay under EMBED_MAX_TOTAL bytes together. base64 makes them a third
# larger, and they all travel in one argument list.
EMBED_MAX_FILE = 1024
EMBED_MAX_TOTAL = 8 * 1024
# Above this size, `auto` needs --shared-dir.
TRANSFER_MAX_FILE = 100 * 1024 * 1024
DEFAULT_DURATION = 24 * 3600

# Job directories are created under this directory, relative to the home
# directory of the user on the submit node.
JOBS_DIR = "sandboxfs-jobs"
INPUT_DIR = "input"
SUBMIT_FILE = "job.sub"

STRATEGIES = ("auto", "embed", "transfer", "shared")

_JOB_ID = re.compile(r"[0-9]+(\.[0-9]+)?")
_JOB_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Output names go into transfer_output_files, a comma- and space-separated list.
_OUTPUT_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.+-]*(/[A-Za-z0-9_.][A-Za-z0-9_.+-]*)*")
# The shared directory goes into initialdir and environment, which HTCondor
# parses further (macros with '$', quotes, spaces between words).
_SHARED_DIR = re.compile(r"/[A-Za-z0-9_./+@:-]*")

# The job script, run as `sh -c SCRIPT sandboxfs-job DURATION [KIND NAME VALUE]...`.
# KIND is E (VALUE is the file's content) or L (VALUE is the target of a
# symbolic link); NAME and VALUE are base64, so that any bytes survive
# HTCondor's argument parsing. The route to the job flattens newlines, so the
# script is one line. It must not contain "$(", which starts a submit macro.
# NOTE: the backquotes drop trailing newlines from a decoded name.
_JOB_SCRIPT = " ".join(
    (
        "stop() { kill \"$pid\" 2>/dev/null; exit 0; };",
        "trap stop TERM INT;",
        "duration=$1; shift;",
        "while [ \"$#\" -ge 3 ]; do",
        "name=`printf %s \"$2\" | base64 -d` || exit 1;",
        "case \"$1\" in",
        "E) printf %s \"$3\" | base64 -d > \"./$name\" || exit 1 ;;",
        "L) target=`printf %s \"$3\" | base64 -d` && ln -sfn \"$target\" \"./$name\" || exit 1 ;;",
        "esac;",
        "shift 3;",
        "done;",
        "sleep \"$duration\" & pid=$!;",
        "wait \"$pid\";",
        "exit 0",
    )
)


class CondorError(Exception):
    """A condor command failed or got invalid input; the message is one line for the user."""


# Checking what the user gave.


@dataclasses.dataclass(frozen=True)
class SubmitHost:
    """The submit node, reached with ssh: `[USER@]HOST[:PORT]`."""

    host: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"{user}{self.host}{port}"


def parse_submit_host(text: str) -> SubmitHost:
    """Parse `[USER@]HOST[:PORT]`; raise CondorError naming the invalid part."""
    user, at, rest = text.rpartition("@")
    host, colon, port_text = rest.partition(":")
    try:
        if at:
            check_ssh_user(user, text)
        check_ssh_host(host, text)
    except SourceError as exc:
        raise CondorError(f"invalid --submit-host: {exc}") from None
    port = None
    if colon:
        if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise CondorError(f"invalid port {port_text!r} in --submit-host {text!r}: give a number from 1 to 65535")
        port = int(port_text)
    return SubmitHost(host, user if at else None, port)


def check_job_id(text: str) -> str:
    """Return `text` if it is a job id (CLUSTER or CLUSTER.PROC); raise CondorError otherwise."""
    if not text.isascii() or not _JOB_ID.fullmatch(text):
        raise CondorError(f"invalid job id {text!r}: give CLUSTER.PROC as `condor submit` printed it, such as 42.0")
    return text


def check_job_name(text: str) -> str:
    """Return `text` if it can be a batch name and part of a directory name; raise CondorError otherwise."""
    if not text.isascii() or not _JOB_NAME.fullmatch(text) or len(text) > 64:
        raise CondorError(
            f"invalid --name {text!r}: use up to 64 letters, digits, '_', '.', '-', not starting with '.' or '-'"
        )
    return text


def check_output_name(text: str) -> str:
    """Return `text` if it can go into transfer_output_files; raise CondorError otherwise."""
    if not text.isascii() or not _OUTPUT_NAME.fullmatch(text) or ".." in text.split("/"):
        raise CondorError(
            f"invalid --output {text!r}: give a path relative to the job's scratch directory made of "
            "letters, digits, '_', '.', '+', '-' and '/' (HTCondor separates output names with commas and spaces)"
        )
    return text


def check_shared_dir(text: str) -> str:
    """Return the normalized `text` if it can be used as --shared-dir; raise CondorError otherwise."""
    if not _SHARED_DIR.fullmatch(text) or ".." in text.split("/"):
        raise CondorError(
            f"invalid --shared-dir {text!r}: give an absolute path without '..', made of "
            "letters, digits and '_', '.', '/', '+', '@', ':', '-'"
        )
    return os.path.normpath(text)


# The staging plan.


@dataclasses.dataclass(frozen=True)
class StagedFile:
    """One FILE of the command line and how it reaches the job.

    `name` is the name in the job's scratch directory. `source` is the local
    path for embed and transfer, and the path on the shared filesystem for
    shared. `size` is None for a shared file that was not read here.
    """

    name: str
    source: str
    strategy: str
    size: int | None


@dataclasses.dataclass
class JobRequest:
    """The job that `condor submit` is requested to start: its files, staging strategy and resources."""

    files: list[str]
    strategy: str = "auto"
    shared_dir: str | None = None
    outputs: list[str] = dataclasses.field(default_factory=list)
    request_memory: int | None = None
    request_cpus: int | None = None
    duration: int = DEFAULT_DURATION
    name: str = "sandbox"


@dataclasses.dataclass(frozen=True)
class StagingPlan:
    files: tuple[StagedFile, ...]
    shared_dir: str | None

    def by_strategy(self, strategy: str) -> list[StagedFile]:
        return [file for file in self.files if file.strategy == strategy]

    @property
    def in_place(self) -> bool:
        """Whether the job runs in the shared directory itself, without file transfer."""
        return bool(self.files) and all(file.strategy == "shared" for file in self.files)

    def describe(self) -> list[str]:
        """Return one line per file, for --dry-run."""
        lines = []
        for file in self.files:
            size = f"{file.size} bytes" if file.size is not None else "size not checked"
            where = {
                "embed": "embedded in the job's arguments",
                "transfer": f"copied to {INPUT_DIR}/ in the job directory, then sent with transfer_input_files",
                "shared": "used in place on the shared filesystem",
            }[file.strategy]
            lines.append(f"{file.strategy:<8} {file.source!r} -> {file.name!r} ({size}): {where}")
        return lines


def plan_staging(request: JobRequest) -> StagingPlan:
    """Decide how each file reaches the job; raise CondorError for a file that cannot."""
    shared_dir = check_shared_dir(request.shared_dir) if request.shared_dir is not None else None
    if request.strategy == "shared" and shared_dir is None:
        raise CondorError("--strategy shared needs --shared-dir DIR: the directory that the submit and execute nodes share")

    files = []
    embedded_total = 0
    for path in request.files:
        if request.strategy == "shared":
            staged = _shared_file(path, shared_dir, None)
        else:
            staged = _local_file(path, request.strategy, shared_dir, embedded_total)
        if staged.strategy == "embed":
            embedded_total += staged.size
        files.append(staged)

    _check_unique_names(files)
    plan = StagingPlan(tuple(files), shared_dir)
    if plan.in_place and request.outputs:
        raise CondorError(
            "--output needs file transfer, and a job whose files are all shared runs in place in --shared-dir: "
            "write the outputs there, or use --strategy transfer"
        )
    return plan


def _local_file(path: str, strategy: str, shared_dir: str | None, embedded_total: int) -> StagedFile:
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise CondorError(f"cannot read {path!r}: {exc.strerror}") from None
    if not os.path.isfile(path):
        raise CondorError(f"{path!r} is not a regular file: give files, not directories")
    name = _file_name(path)

    if strategy == "embed":
        if size >= EMBED_MAX_FILE or embedded_total + size >= EMBED_MAX_TOTAL:
            raise CondorError(
                f"{path!r} is {size} bytes, and --strategy embed takes files under {EMBED_MAX_FILE} bytes "
                f"and {EMBED_MAX_TOTAL} bytes in all: use --strategy transfer"
            )
        return StagedFile(name, path, "embed", size)
    if strategy == "transfer":
        return StagedFile(name, path, "transfer", size)

    if size < EMBED_MAX_FILE and embedded_total + size < EMBED_MAX_TOTAL:
        return StagedFile(name, path, "embed", size)
    if size < TRANSFER_MAX_FILE:
        return StagedFile(name, path, "transfer", size)
    if shared_dir is None:
        raise CondorError(
            f"{path!r} is {size} bytes, over the {TRANSFER_MAX_FILE} bytes that are transferred by default: "
            "put it in a shared directory and give --shared-dir DIR, or force --strategy transfer"
        )
    # The shared filesystem (AFS, EOS) has the same paths here and on the nodes.
    return _shared_file(os.path.abspath(path), shared_dir, size)


def _shared_file(path: str, shared_dir: str, size: int | None) -> StagedFile:
    full = os.path.normpath(path if path.startswith("/") else os.path.join(shared_dir, path))
    if os.path.commonpath([full, shared_dir]) != shared_dir or full == shared_dir:
        raise CondorError(
            f"{path!r} is not inside --shared-dir {shared_dir!r}: give a path in that directory, "
            "or use --strategy transfer to copy it"
        )
    return StagedFile(os.path.relpath(full, shared_dir), full, "shared", size)


def _file_name(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    if name in ("", ".", ".."):
        raise CondorError(f"invalid file {path!r}: give a path that ends with a file name")
    return name


def _check_unique_names(files: Sequence[StagedFile]) -> None:
    seen: dict[str, str] = {}
    for file in files:
        if file.name in seen:
            raise CondorError(
                f"{seen[file.name]!r} and {file.source!r} would both be {file.name!r} in the job: rename one of them"
            )
        seen[file.name] = file.source


# The submit description.


def condor_arguments(words: Sequence[str]) -> str:
    """Return the value of `arguments` that gives the job exactly `words`.

    This is HTCondor's newer syntax: the value is in double quotes, a word
    with spaces or quotes is in single quotes, and a quote of either kind is
    doubled. Raises ValueError for a newline, which ends the submit line, and
    for "$(", which starts a submit macro.
    """
    quoted = []
    for word in words:
        if "\n" in word or "\r" in word or "$(" in word:
            raise ValueError(f"argument {word!r} contains a newline or '$(', which a submit file cannot carry")
        if word == "" or re.search(r"[\s'\"]", word):
            word = "'" + word.replace("'", "''") + "'"
        quoted.append(word.replace('"', '""'))
    return '"' + " ".join(quoted) + '"'


def _encode(text: str | bytes) -> str:
    return base64.b64encode(os.fsencode(text)).decode("ascii")


def job_arguments(plan: StagingPlan, duration: int) -> list[str]:
    """Return the job's argument list: the script, the duration, the files to write or link."""
    words = ["-c", _JOB_SCRIPT, "sandboxfs-job", str(duration)]
    for file in plan.by_strategy("embed"):
        with open(file.source, "rb") as stream:
            content = stream.read()
        words += ["E", _encode(file.name), _encode(content)]
    if not plan.in_place:
        for file in plan.by_strategy("shared"):
            words += ["L", _encode(file.name), _encode(file.source)]
    return words


def submit_description(request: JobRequest, plan: StagingPlan, job_dir: str) -> str:
    """Return the submit description of the job.

    Paths in it are relative to the directory condor_submit runs in, which is
    `job_dir`, except for the files of an in-place job: its initialdir is the
    shared directory, so the job's log and output go to `job_dir` by absolute path.
    """
    lines = [
        "# A sandboxfs sandbox job: it sleeps so that its scratch directory can be mounted.",
        "universe = vanilla",
        "executable = /bin/sh",
        "transfer_executable = false",
        f"arguments = {condor_arguments(job_arguments(plan, request.duration))}",
        f"batch_name = {request.name}",
    ]
    if request.request_cpus is not None:
        lines.append(f"request_cpus = {request.request_cpus}")
    if request.request_memory is not None:
        lines.append(f"request_memory = {request.request_memory}")

    prefix = ""
    if plan.in_place:
        lines += ["should_transfer_files = NO", f"initialdir = {plan.shared_dir}"]
        prefix = job_dir.rstrip("/") + "/"
    else:
        # File transfer gives the job its own scratch directory, also when no file is transferred.
        lines += ["should_transfer_files = YES", "when_to_transfer_output = ON_EXIT"]
        if plan.by_strategy("transfer"):
            # A trailing slash sends the directory's contents, not the directory.
            lines.append(f"transfer_input_files = {INPUT_DIR}/")
        if request.outputs:
            lines.append(f"transfer_output_files = {','.join(request.outputs)}")
    if plan.shared_dir is not None:
        lines.append(f'environment = "SANDBOXFS_SHARED_DIR={plan.shared_dir}"')

    lines += [f"log = {prefix}job.log", f"output = {prefix}job.out", f"error = {prefix}job.err", "queue", ""]
    return "\n".join(lines)


def new_job_dir(name: str) -> str:
    """Return a new job directory path, relative to the home directory on the submit node."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{JOBS_DIR}/{name}-{stamp}-{secrets.token_hex(3)}"


# The submit node.


class SubmitNode:
    """Runs argvs on the submit node: this host (`local`) or one reached with ssh.

    Commands start in the user's home directory on the node. `bindings` is
    the htcondor2 module when the node is this host and the module can be
    imported, else None. `close` stops the ssh connection.
    """

    def __init__(self, host: SubmitHost | None, ssh_command: Sequence[str] = ("ssh",)) -> None:
        self.label = str(host) if host is not None else "this host"
        self._ssh = None
        self.bindings = None
        if host is not None:
            self._ssh = SshConnection(host.host, host.user, host.port, ssh_command)
        else:
            self.bindings = load_bindings()

    def run(self, argv: Sequence[Argument], stdin: bytes | None = None) -> subprocess.CompletedProcess:
        """Run `argv`; raise CondorError if it cannot start or if ssh fails."""
        host_argv, cwd = self._host_command(argv)
        try:
            result = subprocess.run(host_argv, input=stdin or b"", capture_output=True, cwd=cwd)
        except OSError as exc:
            raise self._start_error(host_argv, exc) from None
        self._check_route(result)
        return result

    def stream_to(
        self, argv: Sequence[Argument], write_stdin: Callable[[BinaryIO], None]
    ) -> subprocess.CompletedProcess:
        """Run `argv` with `write_stdin(pipe)` writing its stdin; raise CondorError as `run` does."""
        host_argv, cwd = self._host_command(argv)
        # Output goes to files, so that a command that writes much cannot block while stdin is written.
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            try:
                process = subprocess.Popen(host_argv, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=cwd)
            except OSError as exc:
                raise self._start_error(host_argv, exc) from None
            # A command that exits early breaks the pipe; its status and stderr tell why.
            with contextlib.suppress(BrokenPipeError):
                write_stdin(process.stdin)
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
            returncode = process.wait()
            stdout.seek(0)
            stderr.seek(0)
            result = subprocess.CompletedProcess(host_argv, returncode, stdout.read(), stderr.read())
        self._check_route(result)
        return result

    def _host_command(self, argv: Sequence[Argument]) -> tuple[list[Argument], str | None]:
        """Return the argv to run on this host, and its working directory."""
        logger.debug("on %s: %r", self.label, list(argv))
        if self._ssh is None:
            return list(argv), os.path.expanduser("~")
        # ssh runs the command in the home directory on the node.
        return self._ssh.prefix([]).argv(argv), None

    @staticmethod
    def _start_error(host_argv: Sequence[Argument], exc: OSError) -> CondorError:
        program = os.fsdecode(host_argv[0])
        return CondorError(f"cannot run {program}: {exc.strerror}: install it, or give the ssh command with --ssh-command")

    def _check_route(self, result: subprocess.CompletedProcess) -> None:
        if self._ssh is None:
            return
        message = self._ssh.diagnose(result.returncode, result.stderr)
        if message is not None:
            raise CondorError(message)

    def close(self) -> None:
        if self._ssh is not None:
            trio.run(self._ssh.aclose)
            self._ssh = None


def load_bindings():
    """Return the htcondor2 module (HTCondor's Python bindings), or None when it cannot be imported."""
    try:
        import htcondor2
    except ImportError as exc:
        logger.info("cannot import htcondor2 (%s): using condor_submit and condor_rm", exc)
        return None
    return htcondor2


def _check(result: subprocess.CompletedProcess, action: str) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise CondorError(f"{action} failed: {_detail(result)}")
    return result


def _detail(result: subprocess.CompletedProcess) -> str:
    return last_line(result.stderr) or last_line(result.stdout) or f"exit status {result.returncode}"


# Submitting and removing.
#
# On this host the htcondor2 bindings talk to the schedd when they can be
# imported. On a node reached with ssh, and without the bindings, the
# condor_submit and condor_rm tools run on the node. Either way the result is
# the same job id, and a failure is the same CondorError.

# The messages of HTCondor 23.9 when it finds no schedd on the node:
# condor_submit "ERROR: Can't find address of local schedd", condor_rm "Can't
# find address for schedd NAME" when the schedd is stopped and "condor_rm:
# (null)" when no collector replies either, and htcondor2's RuntimeError
# "Unable to locate local daemon.".
_NO_SCHEDD = ("Can't find address", "condor_rm: (null)", "Unable to locate local daemon")


def _failure(action: str, label: str, detail: str) -> CondorError:
    """Return the CondorError for `action` on the node, with a detail from the tool or the bindings."""
    if any(text in detail for text in _NO_SCHEDD):
        detail = "no HTCondor schedd found: check that HTCondor runs there (condor_status -schedd)"
    return CondorError(f"{action} on {label} failed: {detail}")


def _bindings_errors(bindings) -> tuple[type[Exception], ...]:
    # htcondor2 23.9 raises RuntimeError and ValueError; later versions add HTCondorException.
    return (RuntimeError, ValueError, getattr(bindings, "HTCondorException", RuntimeError))


@dataclasses.dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    # The job directory on the submit node, as an absolute path.
    job_dir: str


def submit_job(node: SubmitNode, request: JobRequest, plan: StagingPlan, job_dir: str) -> SubmittedJob:
    """Create the job directory, stage the files and submit; return the job id."""
    absolute_dir = _make_job_dir(node, job_dir, with_input=bool(plan.by_strategy("transfer")))
    _check_shared_files(node, plan)
    if plan.by_strategy("transfer"):
        _upload(node, plan.by_strategy("transfer"), f"{absolute_dir}/{INPUT_DIR}")

    description = submit_description(request, plan, absolute_dir)
    submit_path = f"{absolute_dir}/{SUBMIT_FILE}"
    _check(node.run(["sh", "-c", 'cat > "$1"', "sh", submit_path], stdin=description.encode()), f"writing {submit_path} on {node.label}")

    if node.bindings is not None:
        job_id = _submit_with_bindings(node.bindings, description, absolute_dir, node.label)
    else:
        job_id = _submit_with_tools(node, absolute_dir)
    logger.info("submitted job %s on %s from %s", job_id, node.label, absolute_dir)
    return SubmittedJob(job_id, absolute_dir)


def _make_job_dir(node: SubmitNode, job_dir: str, with_input: bool) -> str:
    path = f"{job_dir}/{INPUT_DIR}" if with_input else job_dir
    result = _check(
        node.run(["sh", "-c", 'mkdir -p -- "$1" && cd -- "$2" && pwd -P', "sh", path, job_dir]),
        f"creating the job directory {job_dir} on {node.label}",
    )
    return result.stdout.decode("utf-8", "surrogateescape").strip()


def _check_shared_files(node: SubmitNode, plan: StagingPlan) -> None:
    shared = plan.by_strategy("shared")
    if not shared:
        return
    script = 'for f; do [ -r "$f" ] || { printf "%s\\n" "$f"; exit 1; }; done'
    result = node.run(["sh", "-c", script, "sh", *(file.source for file in shared)])
    if result.returncode != 0:
        missing = result.stdout.decode("utf-8", "surrogateescape").strip()
        raise CondorError(f"{missing!r} is missing or unreadable on {node.label}: check the path in --shared-dir")


def _upload(node: SubmitNode, files: Sequence[StagedFile], directory: str) -> None:
    """Copy `files` into `directory` on the node as one tar stream."""

    def write_archive(pipe) -> None:
        with tarfile.open(fileobj=pipe, mode="w|", encoding="utf-8", errors="surrogateescape") as archive:
            for file in files:
                info = archive.gettarinfo(file.source, arcname=file.name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(file.source, "rb") as stream:
                    archive.addfile(info, stream)

    result = node.stream_to(["tar", "-x", "-f", "-", "-C", directory], write_archive)
    _check(result, f"copying the files to {directory} on {node.label}")
    logger.info("copied %d files to %s on %s", len(files), directory, node.label)


def _submit_with_tools(node: SubmitNode, job_dir: str) -> str:
    """Submit `job_dir`/job.sub with condor_submit, run in `job_dir`; return the job id."""
    result = node.run(["sh", "-c", 'cd "$1" && exec condor_submit -terse "$2"', "sh", job_dir, SUBMIT_FILE])
    if result.returncode != 0:
        raise _failure("submitting the job", node.label, _detail(result))
    return _parse_terse(result.stdout)


def _parse_terse(stdout: bytes) -> str:
    # condor_submit -terse prints "FIRST - LAST", such as "42.0 - 42.0".
    first = stdout.decode("utf-8", "replace").strip().split(" ")[0]
    if not _JOB_ID.fullmatch(first):
        raise CondorError(f"unexpected output of condor_submit -terse: {last_line(stdout)!r}")
    return first


def _submit_with_bindings(bindings, description: str, job_dir: str, label: str) -> str:
    """Submit `description` through htcondor2; return the job id."""
    try:
        submit = bindings.Submit(description)
        # The description's relative paths start in job_dir, where condor_submit
        # would run. The bindings start them in initialdir, which defaults to
        # this process's working directory.
        if not submit.get("initialdir"):
            submit["initialdir"] = job_dir
        result = bindings.Schedd().submit(submit)
    except _bindings_errors(bindings) as exc:
        raise _failure("submitting the job", label, str(exc)) from exc
    return f"{result.cluster()}.{result.first_proc()}"


def remove_job(node: SubmitNode, job_id: str) -> str:
    """Remove job `job_id` with htcondor2 or condor_rm; return a message such as "Job 42.0 marked for removal"."""
    check_job_id(job_id)
    if node.bindings is not None:
        return _remove_with_bindings(node.bindings, job_id, node.label)
    result = node.run(["condor_rm", job_id])
    if result.returncode != 0:
        raise _failure(f"removing job {job_id}", node.label, _detail(result))
    return last_line(result.stdout)


def _remove_with_bindings(bindings, job_id: str, label: str) -> str:
    try:
        # A list is always read as job ids; a string that is not one would be
        # read as a constraint.
        outcome = bindings.Schedd().act(bindings.JobAction.Remove, [job_id])
    except _bindings_errors(bindings) as exc:
        raise _failure(f"removing job {job_id}", label, str(exc)) from exc
    if outcome["TotalSuccess"] > 0:
        # condor_rm 23.9 prints the same line.
        return f"Job {job_id} marked for removal"
    raise _failure(f"removing job {job_id}", label, _act_detail(outcome, job_id))


def _act_detail(outcome, job_id: str) -> str:
    """Return why Schedd.act removed nothing, from the counts in its result ClassAd."""
    if outcome["TotalNotFound"] > 0:
        # condor_rm 23.9 prints the same line for a job that is not in the queue.
        return f"Job {job_id} not found"
    # NOTE: condor_rm's wording for these cases was not compared.
    if outcome["TotalPermissionDenied"] > 0:
        return f"permission denied to remove job {job_id}"
    if outcome["TotalAlreadyDone"] > 0:
        return f"Job {job_id} is already being removed"
    if outcome["TotalBadStatus"] > 0:
        return f"job {job_id} is in a state that cannot be removed"
    return f"the schedd removed no job (result {dict(outcome)!r})"
