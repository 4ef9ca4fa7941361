"""`sandboxfs condor submit` and `condor rm` against a real HTCondor pool.

The pool runs in the trixie test container (`trixie_condor_host`). Commands
run as alice through ssh, as a user would run them with `--submit-host`, or
inside the container with `--local`, where sandboxfs runs as
`python3 -m sandboxfs`, with HTCondor's htcondor2 bindings or with them
hidden. The file checks read the job's scratch directory with
`condor_ssh_to_job`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import time
import uuid

import pytest

from sandboxfs.cli_condor import CondorError, add_condor_commands, run_condor
from sandboxfs.condor_jobs import EMBED_MAX_FILE, TRANSFER_MAX_FILE, JobRequest, condor_arguments, plan_staging

# A job starts within about 5 s in the test pool; the limit leaves room for a loaded machine.
JOB_START_TIMEOUT = 90.0
JOB_EXIT_TIMEOUT = 120.0
POLL_INTERVAL = 0.5

RUNNING = "2"


def condor(*argv: str) -> None:
    """Run `sandboxfs condor ARGV...` in this process, as cli.py wires it."""
    parser = argparse.ArgumentParser(prog="sandboxfs")
    add_condor_commands(parser.add_subparsers(dest="command", required=True))
    run_condor(parser.parse_args(["condor", *argv]))


class Pool:
    """The test pool, reached as alice through ssh."""

    def __init__(self, host) -> None:
        self.host = host
        self.route = ["--submit-host", f"alice@{host.host_alias}", "--ssh-command", f"ssh -F {host.ssh_config}"]
        self.jobs: list[str] = []

    def ssh(self, argv: list[str], input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        destination = f"alice@{self.host.host_alias}"
        result = subprocess.run(
            ["ssh", "-F", self.host.ssh_config, destination, shlex.join(argv)], capture_output=True, input=input
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{argv!r} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
        return result

    def submit(self, capsys, *argv: str) -> tuple[str, str]:
        """Submit with `condor submit`; return (job id, stderr)."""
        capsys.readouterr()
        condor("submit", *self.route, *argv)
        captured = capsys.readouterr()
        job_id = captured.out.strip()
        self.jobs.append(job_id)
        return job_id, captured.err

    def attribute(self, job_id: str, name: str) -> str:
        """Return a job attribute from the queue, or from the history once the job left it."""
        value = self.ssh(["condor_q", job_id, "-af", name]).stdout.decode().strip()
        if value:
            return value
        return self.ssh(["condor_history", job_id, "-limit", "1", "-af", name]).stdout.decode().strip()

    def wait_running(self, job_id: str) -> None:
        deadline = time.monotonic() + JOB_START_TIMEOUT
        while (status := self.attribute(job_id, "JobStatus")) != RUNNING:
            if status in ("3", "4", "5"):
                reason = self.attribute(job_id, "HoldReason")
                raise AssertionError(f"job {job_id} ended or was held before it ran: status {status}, {reason}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} did not run within {JOB_START_TIMEOUT:.0f} s: status {status}")
            time.sleep(POLL_INTERVAL)

    def wait_left_queue(self, job_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.ssh(["condor_q", job_id, "-af", "JobStatus"]).stdout.strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} was still in the queue after {timeout:.0f} s")
            time.sleep(POLL_INTERVAL)

    def read_in_job(self, job_id: str, name: str) -> bytes:
        """Return the bytes of `name` in the job's working directory."""
        # condor_ssh_to_job hands its words to a shell in the job, so the name is quoted once more.
        return self.ssh(["condor_ssh_to_job", "-auto-retry", job_id, "cat", shlex.quote(name)]).stdout

    def remove_all(self) -> None:
        """Remove this test's jobs and wait until they left the queue, so that the next test gets a slot."""
        for job_id in self.jobs:
            self.ssh(["condor_rm", job_id], check=False)
        for job_id in self.jobs:
            self.wait_left_queue(job_id, JOB_EXIT_TIMEOUT)


@pytest.fixture
def pool(trixie_condor_host):
    pool = Pool(trixie_condor_host)
    yield pool
    pool.remove_all()


def write(directory, name: str, content: bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as file:
        file.write(content)
    return path


def job_dir_from(stderr: str) -> str:
    # The message contains "its files are in DIR on HOST".
    line = next(line for line in stderr.splitlines() if "its files are in" in line)
    return line.split("its files are in ", 1)[1].rsplit(" on ", 1)[0]


# Staging strategies, end to end.


def test_embed_files_arrive_in_scratch_dir(pool, tmp_path, capsys):
    files = {
        "notes.txt": b"first line\nsecond line\n",
        "name with spaces.txt": b"spaces in the name\n",
        "binary.bin": bytes(range(256)) * 3,
    }
    paths = [write(tmp_path, name, content) for name, content in files.items()]

    job_id, stderr = pool.submit(capsys, "--strategy", "embed", "--duration", "600", *paths)
    pool.wait_running(job_id)

    assert f"condor://alice@{pool.host.host_alias}/{job_id}" in stderr
    scratch = pool.attribute(job_id, "RemoteIwd") or ""
    assert "input" not in pool.ssh(["ls", job_dir_from(stderr)]).stdout.decode().split()
    for name, content in files.items():
        assert pool.read_in_job(job_id, name) == content, f"{name} differs in job {job_id} ({scratch})"


def test_transfer_files_arrive_in_scratch_dir(pool, tmp_path, capsys):
    files = {
        "big binary.dat": os.urandom(300 * 1024),
        "quote's.txt": b"x" * 5000,
    }
    paths = [write(tmp_path, name, content) for name, content in files.items()]

    job_id, stderr = pool.submit(capsys, "--duration", "600", *paths)
    pool.wait_running(job_id)

    staged = pool.ssh(["ls", f"{job_dir_from(stderr)}/input"]).stdout.decode().splitlines()
    assert sorted(staged) == sorted(files)
    for name, content in files.items():
        assert pool.read_in_job(job_id, name) == content, f"{name} differs in job {job_id}"


def test_shared_files_used_in_place(pool, capsys):
    shared = f"/srv/shared/{uuid.uuid4().hex[:8]}"
    content = b"on the shared filesystem\x00\xff\n"
    pool.host.exec(["install", "-d", "-o", "alice", "-g", "alice", "/srv/shared", shared])
    pool.host.exec(["sh", "-c", 'cat > "$1"', "sh", f"{shared}/data one.bin"], user="alice", input=content)

    job_id, stderr = pool.submit(capsys, "--strategy", "shared", "--shared-dir", shared, "--duration", "600", "data one.bin")
    pool.wait_running(job_id)

    assert pool.attribute(job_id, "Iwd") == shared
    assert pool.attribute(job_id, "ShouldTransferFiles") == '"NO"' or pool.attribute(job_id, "ShouldTransferFiles") == "NO"
    assert pool.read_in_job(job_id, "data one.bin") == content
    assert "input" not in pool.ssh(["ls", job_dir_from(stderr)]).stdout.decode().split()


def test_shared_file_missing_on_submit_node(pool, capsys):
    with pytest.raises(CondorError, match="missing or unreadable"):
        pool.submit(capsys, "--strategy", "shared", "--shared-dir", "/srv/shared", "no such file")


def test_dry_run_accepted_by_condor_submit(pool, tmp_path, capsys):
    paths = [write(tmp_path, "a b.txt", b"a"), write(tmp_path, "big.bin", os.urandom(4096))]
    before = pool.ssh(["sh", "-c", "ls sandboxfs-jobs 2>/dev/null | wc -l"]).stdout

    capsys.readouterr()
    condor("submit", "--dry-run", *pool.route, "--output", "result.txt", "--request-memory", "64", *paths)
    captured = capsys.readouterr()

    assert "embed" in captured.err
    assert "transfer" in captured.err
    result = pool.ssh(["condor_submit", "-dry-run", "-", "-"], input=captured.out.encode(), check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b'Cmd="/bin/sh"' in result.stdout
    assert re.search(rb'TransferOutput ?= ?"result.txt"', result.stdout)
    assert re.search(rb"RequestMemory ?= ?64\n", result.stdout)
    assert pool.ssh(["sh", "-c", "ls sandboxfs-jobs 2>/dev/null | wc -l"]).stdout == before


def test_output_comes_back_at_exit(pool, tmp_path, capsys):
    content = os.urandom(700)
    path = write(tmp_path, "result.bin", content)

    job_id, stderr = pool.submit(capsys, "--duration", "5", "--output", "result.bin", path)
    pool.wait_left_queue(job_id, JOB_EXIT_TIMEOUT)

    assert pool.attribute(job_id, "ExitCode") == "0"
    assert "outputs come back to" in stderr
    returned = pool.ssh(["cat", f"{job_dir_from(stderr)}/result.bin"]).stdout
    assert returned == content


def test_rm_removes_job(pool, tmp_path, capsys):
    job_id, _ = pool.submit(capsys, "--duration", "600", write(tmp_path, "f.txt", b"f"))
    pool.wait_running(job_id)

    condor("rm", *pool.route, job_id)

    pool.wait_left_queue(job_id, JOB_EXIT_TIMEOUT)
    assert pool.attribute(job_id, "JobStatus") == "3"


def test_rm_unknown_job_fails(pool):
    with pytest.raises(CondorError, match="removing job 999999.0 on alice@.* failed: Job 999999.0 not found") as error:
        condor("rm", *pool.route, "999999.0")
    assert "\n" not in str(error.value)


# This host as the submit node: --local, run inside the pool's container.

LOCAL_ROUTES = [pytest.param(True, id="bindings"), pytest.param(False, id="tools")]
# JobSubmitMethod of HTCondor 23.9: 0 for condor_submit, 2 for the Python bindings.
SUBMIT_METHOD = {True: "2", False: "0"}
# A configuration under which no HTCondor daemon can be found: the collector
# address is a closed port on the loopback interface.
NO_POOL_CONFIG = b"COLLECTOR_HOST = 127.0.0.1:1\nLOCAL_DIR = /tmp/sbxtest-no-pool\nUSE_SHARED_PORT = False\n"


def local_condor(pool, *argv: str, bindings: bool, env: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `sandboxfs condor ARGV` as alice inside the pool's container."""
    return pool.host.sandboxfs(["condor", *argv], bindings=bindings, env=env)


def write_in_container(pool, directory: str, files: dict[str, bytes]) -> list[str]:
    pool.host.exec(["mkdir", "-p", directory], user="alice")
    paths = []
    for name, content in files.items():
        path = f"{directory}/{name}"
        pool.host.exec(["sh", "-c", 'cat > "$1"', "sh", path], user="alice", input=content)
        paths.append(path)
    return paths


@pytest.mark.parametrize("bindings", LOCAL_ROUTES)
def test_local_submit_and_rm(pool, bindings):
    files = {"notes.txt": b"first line\nsecond line\n", "big file.bin": os.urandom(300 * 1024)}
    paths = write_in_container(pool, f"/home/alice/sbxtest-{uuid.uuid4().hex[:8]}", files)

    submitted = local_condor(pool, "submit", "--local", "--duration", "600", *paths, bindings=bindings)
    assert submitted.returncode == 0, submitted.stderr.decode(errors="replace")
    job_id = submitted.stdout.decode().strip()
    pool.jobs.append(job_id)
    assert re.fullmatch(r"[0-9]+\.0", job_id)
    assert f"sandboxfs mount condor://local/{job_id} MOUNTPOINT".encode() in submitted.stderr
    assert f"sandboxfs condor rm --local {job_id}".encode() in submitted.stderr
    assert pool.attribute(job_id, "JobSubmitMethod") == SUBMIT_METHOD[bindings]

    pool.wait_running(job_id)
    for name, content in files.items():
        assert pool.read_in_job(job_id, name) == content, f"{name} differs in job {job_id}"

    removed = local_condor(pool, "rm", "--local", job_id, bindings=bindings)
    assert removed.returncode == 0, removed.stderr.decode(errors="replace")
    assert removed.stderr.decode().strip() == f"Job {job_id} marked for removal"
    pool.wait_left_queue(job_id, JOB_EXIT_TIMEOUT)
    assert pool.attribute(job_id, "JobStatus") == "3"


def local_errors(pool, bindings: bool) -> list[str]:
    """Return the stderr of `rm` of an unknown job, then of `submit` and `rm` with no pool."""
    [path] = write_in_container(pool, f"/home/alice/sbxtest-{uuid.uuid4().hex[:8]}", {"f.txt": b"f"})
    no_pool = ("CONDOR_CONFIG=/tmp/sbxtest-no-pool.config",)
    results = [
        local_condor(pool, "rm", "--local", "999999.0", bindings=bindings),
        local_condor(pool, "submit", "--local", path, bindings=bindings, env=no_pool),
        local_condor(pool, "rm", "--local", "1.0", bindings=bindings, env=no_pool),
    ]
    for result in results:
        assert result.returncode == 1, result.stdout
    return [result.stderr.decode(errors="replace") for result in results]


def test_local_errors_match_across_routes(pool):
    pool.host.exec(["sh", "-c", 'cat > "$1"', "sh", "/tmp/sbxtest-no-pool.config"], input=NO_POOL_CONFIG)

    with_bindings = local_errors(pool, bindings=True)
    with_tools = local_errors(pool, bindings=False)

    assert with_bindings == with_tools
    unknown, submit, remove = with_bindings
    assert unknown == "sandboxfs: error: removing job 999999.0 on this host failed: Job 999999.0 not found\n"
    no_schedd = "failed: no HTCondor schedd found: check that HTCondor runs there (condor_status -schedd)\n"
    assert submit == f"sandboxfs: error: submitting the job on this host {no_schedd}"
    assert remove == f"sandboxfs: error: removing job 1.0 on this host {no_schedd}"


# Input checks.


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["rm", "--submit-host=-oProxyCommand=touch", "1.0"], "invalid ssh host '-oProxyCommand=touch'"),
        (["rm", "--submit-host", "alice@host name", "1.0"], "invalid ssh host 'host name'"),
        (["rm", "--submit-host=-l@host", "1.0"], "invalid ssh user '-l'"),
        (["rm", "--submit-host", "host:99999", "1.0"], "invalid port '99999'"),
        (["rm", "--submit-host", "host", "--", "-forcex"], "invalid job id '-forcex'"),
        (["rm", "--submit-host", "host", "1.0 2.0"], "invalid job id '1.0 2.0'"),
        (["rm", "1.0"], "no submit node given"),
        (["submit", "--submit-host", "host"], "no FILES given"),
        (["submit", "--submit-host", "host", "/no/such/file"], "cannot read '/no/such/file'"),
        (["submit", "--submit-host", "host", "--strategy", "shared", "x"], "--strategy shared needs --shared-dir"),
        (["submit", "--submit-host", "host", "--shared-dir", "rel/dir", "x"], "invalid --shared-dir 'rel/dir'"),
        (["submit", "--submit-host", "host", "--name=-x", "/etc/hostname"], "invalid --name '-x'"),
        (
            ["submit", "--submit-host", "host", "--strategy", "shared", "--shared-dir", "/srv/a", "/etc/passwd"],
            "'/etc/passwd' is not inside --shared-dir '/srv/a'",
        ),
    ],
)
def test_invalid_input_one_line_error(argv, expected):
    with pytest.raises(CondorError) as error:
        condor(*argv)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_invalid_output_name_rejected(capsys):
    with pytest.raises(SystemExit):
        condor("submit", "--submit-host", "host", "--output", "a,b", "/etc/hostname")
    assert "invalid --output 'a,b'" in capsys.readouterr().err


def test_embed_rejects_large_file(tmp_path):
    path = write(tmp_path, "big", b"x" * EMBED_MAX_FILE)
    with pytest.raises(CondorError, match="--strategy embed takes files under"):
        plan_staging(JobRequest(files=[path], strategy="embed"))


def test_same_name_twice_rejected(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    paths = [write(tmp_path / "one", "f", b"1"), write(tmp_path / "two", "f", b"2")]
    with pytest.raises(CondorError, match="would both be 'f'"):
        plan_staging(JobRequest(files=paths))


# The auto strategy.


def sparse_file(directory, name: str, size: int) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as file:
        file.truncate(size)
    return path


def test_auto_picks_strategy_by_size(tmp_path):
    small = sparse_file(tmp_path, "small", EMBED_MAX_FILE - 1)
    medium = sparse_file(tmp_path, "medium", EMBED_MAX_FILE)
    shared_dir = tmp_path / "shared"
    shared_dir.mkdir()
    large = sparse_file(shared_dir, "large", TRANSFER_MAX_FILE)

    plan = plan_staging(JobRequest(files=[small, medium, large], shared_dir=str(shared_dir)))

    assert [file.strategy for file in plan.files] == ["embed", "transfer", "shared"]
    assert plan.files[2].source == large


def test_auto_embeds_until_total_limit(tmp_path):
    paths = [sparse_file(tmp_path, f"f{index}", 1000) for index in range(10)]
    plan = plan_staging(JobRequest(files=paths))
    assert [file.strategy for file in plan.files] == ["embed"] * 8 + ["transfer"] * 2


def test_auto_large_file_without_shared_dir(tmp_path):
    large = sparse_file(tmp_path, "large", TRANSFER_MAX_FILE)
    with pytest.raises(CondorError, match="give --shared-dir DIR, or force --strategy transfer"):
        plan_staging(JobRequest(files=[large]))


def test_condor_arguments_quoting():
    assert condor_arguments(["a", "b c", "it's", 'say "hi"', ""]) == "\"a 'b c' 'it''s' 'say \"\"hi\"\"' ''\""
    with pytest.raises(ValueError):
        condor_arguments(["a\nb"])
    with pytest.raises(ValueError):
        condor_arguments(["$(Cluster)"])
