"""What HTCondor makes different: job states, jobs that end while mounted,
the subdirectory form, the shell fallback through condor_ssh_to_job, and
sources that must be rejected before anything runs.

The pool is the personal pool of `trixie_condor_host`; jobs are submitted as
alice, and mounts reach them through ssh as alice. The `condor://local/...`
tests run sandboxfs as alice inside the pool's container, the submit node.
"""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import time
import uuid

import pytest
import trio

from conftest import Mount, condor_job_status, sandboxfs, submit_condor_job, wait_for_condor_job
from sandboxfs.backends.htcondor import connect_condor, job_word
from sandboxfs.sources import SourceError, SshTarget, parse_source

# Seconds a mount of a running job may take; the pool's own start-up of a
# job is waited for separately.
CONNECT_LIMIT = 30.0


@pytest.fixture
def jobs(trixie_condor_host):
    """Submit jobs for one test; remove those still in the queue afterwards."""
    submitted = []

    def submit(executable: str = "/bin/sleep", arguments: str = "3600") -> str:
        job = submit_condor_job(trixie_condor_host, executable, arguments)
        submitted.append(job)
        return job

    yield submit
    if submitted:
        trixie_condor_host.ssh(f"condor_rm {' '.join(submitted)}", user="alice", check=False)


@pytest.fixture
def mounts():
    made = []

    def make(host, job: str, subdir: str = "") -> Mount:
        mount = Mount(f"condor://alice@{host.host_alias}/{job}{subdir}", "--ssh-command", f"ssh -F {host.ssh_config}")
        made.append(mount)
        return mount

    yield make
    for mount in made:
        mount.close()


def mount_error(host, source: str, mountpoint: str) -> str:
    """Mount `source`, expect it to fail, and return its one line of error."""
    result = sandboxfs("mount", "--ssh-command", f"ssh -F {host.ssh_config}", source, mountpoint, check=False)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def wait_until_gone(host, job: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while condor_job_status(host, job) != "":
        assert time.monotonic() < deadline, f"job {job} still in the queue after {timeout} s"
        time.sleep(0.2)


def errno_of(call, *args) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


# Sources.


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("condor://alice@submit/12", "'12'"),
        ("condor://alice@submit/12.0.1", "'12.0.1'"),
        ("condor://alice@submit/-12.0", "'-12.0'"),
        ("condor://alice@submit/1 2.0", "'1 2.0'"),
        ("condor://submit/١٢.٠", "'١٢.٠'"),
        ("condor://-oProxyCommand=x/12.0", "'-oProxyCommand=x'"),
        ("condor://alice@-oProxyCommand=x/12.0", "'-oProxyCommand=x'"),
        ("condor://-l@submit/12.0", "'-l'"),
        ("condor://alice@sub mit/12.0", "'sub mit'"),
        ("condor://alice@[::1]/12.0", "'alice@[::1]'"),
        ("condor://alice@submit:99999/12.0", "'99999'"),
        ("condor://alice@submit/12.0:relative", "'relative'"),
        ("condor://alice@submit/12.0:/a/../../etc", "'/a/../../etc'"),
        ("condor://alice@submit", "'condor://alice@submit'"),
    ],
)
def test_invalid_condor_source_is_rejected(text, named):
    with pytest.raises(SourceError) as info:
        parse_source(text)
    message = str(info.value)
    assert "\n" not in message
    assert named in message


def test_condor_sources_parse_and_print():
    remote = parse_source("condor://alice@submit.example:2222/42.3:/out/logs")
    assert remote.target == "42.3"
    assert remote.root == "/out/logs"
    assert remote.via == SshTarget("submit.example", "alice", 2222)
    assert str(remote) == "condor://alice@submit.example:2222/42.3:/out/logs"

    local = parse_source("condor://local/7.0")
    assert local.via is None
    assert local.root == "/"
    assert str(local) == "condor://local/7.0"


@pytest.mark.parametrize(
    "argument",
    ["plain", "", "two  spaces", "tab\there", "new\nline", "*", "a?[b]", "$(touch pwned)", "'\"`\\", b"\xff\xfe"],
)
def test_job_word_survives_unquoted_eval(argument, tmp_path):
    # condor_ssh_to_job_shell_setup runs `eval ${SSH_ORIGINAL_COMMAND}` in bash.
    (tmp_path / "globbed").write_text("")
    command = b"printf %s " + job_word(argument)
    result = subprocess.run(
        ["bash", "-c", 'eval ${COMMAND}'], env={"COMMAND": command, "PATH": os.environ["PATH"]},
        cwd=tmp_path, capture_output=True, check=True,
    )
    expected = argument if isinstance(argument, bytes) else argument.encode()
    assert result.stdout == expected
    assert not (tmp_path / "pwned").exists()


# Job states.


def test_mount_waits_for_job_to_start(trixie_condor_host, jobs, mounts):
    job = jobs()
    started = time.monotonic()
    mount = mounts(trixie_condor_host, job)
    assert time.monotonic() - started < 60

    with open(os.path.join(mount.path, "hello"), "w") as file:
        file.write("from the host")
    scratch = wait_for_condor_job(trixie_condor_host, job)
    on_node = trixie_condor_host.exec(["cat", f"{scratch}/hello"]).stdout
    assert on_node == b"from the host"


def test_removed_job_while_mounted_fails_fast(trixie_condor_host, jobs, mounts):
    job = jobs()
    wait_for_condor_job(trixie_condor_host, job)
    mount = mounts(trixie_condor_host, job)
    assert os.listdir(mount.path) is not None

    trixie_condor_host.ssh(f"condor_rm {job}", user="alice")
    wait_until_gone(trixie_condor_host, job)
    started = time.monotonic()
    number = errno_of(os.listdir, mount.path)
    assert number in (errno.ENOTCONN, errno.EIO)
    assert time.monotonic() - started < 10

    line = next(info for info in sandboxfs("list").stdout.splitlines() if mount.path in info)
    assert "broken" in line


def test_job_that_ends_while_mounted_fails_fast(trixie_condor_host, jobs, mounts):
    job = jobs(arguments="12")
    wait_for_condor_job(trixie_condor_host, job)
    mount = mounts(trixie_condor_host, job)
    with open(os.path.join(mount.path, "f"), "w") as file:
        file.write("before the end")

    wait_until_gone(trixie_condor_host, job)
    started = time.monotonic()
    assert errno_of(os.stat, os.path.join(mount.path, "new-name")) in (errno.ENOTCONN, errno.EIO)
    assert time.monotonic() - started < 10


def test_held_job_is_one_line_error(trixie_condor_host, jobs, mountpoint):
    job = jobs()
    trixie_condor_host.ssh(f"condor_hold {job}", user="alice")
    line = mount_error(trixie_condor_host, f"condor://alice@{trixie_condor_host.host_alias}/{job}", mountpoint)
    assert f"job {job}" in line
    assert "is held (via condor_hold (by user alice))" in line
    assert f"condor_release {job}" in line


def test_removed_job_is_one_line_error(trixie_condor_host, jobs, mountpoint):
    job = jobs()
    trixie_condor_host.ssh(f"condor_rm {job}", user="alice")
    wait_until_gone(trixie_condor_host, job)
    line = mount_error(trixie_condor_host, f"condor://alice@{trixie_condor_host.host_alias}/{job}", mountpoint)
    assert f"job {job}" in line
    assert "was removed" in line


def test_completed_job_is_one_line_error(trixie_condor_host, jobs, mountpoint):
    job = jobs(executable="/bin/true", arguments="")
    wait_until_gone(trixie_condor_host, job)
    line = mount_error(trixie_condor_host, f"condor://alice@{trixie_condor_host.host_alias}/{job}", mountpoint)
    assert f"job {job}" in line
    assert "has completed" in line


def test_unknown_job_is_one_line_error(trixie_condor_host, mountpoint):
    line = mount_error(trixie_condor_host, f"condor://alice@{trixie_condor_host.host_alias}/999999.0", mountpoint)
    assert "999999.0" in line
    assert "not found" in line


def test_bad_job_id_and_injected_host_are_one_line_errors(trixie_condor_host, mountpoint):
    line = mount_error(trixie_condor_host, f"condor://alice@{trixie_condor_host.host_alias}/12;id", mountpoint)
    assert "invalid job id '12;id'" in line
    line = mount_error(trixie_condor_host, "condor://alice@-oProxyCommand=touch%20x/1.0", mountpoint)
    assert "invalid ssh host '-oProxyCommand=touch%20x'" in line


# Forms and routes.


def test_subdir_form_mounts_directory_in_scratch(trixie_condor_host, jobs, mounts):
    job = jobs()
    scratch = wait_for_condor_job(trixie_condor_host, job)
    trixie_condor_host.exec(["mkdir", "-p", f"{scratch}/out/logs"], user="alice")
    mount = mounts(trixie_condor_host, job, ":/out")

    assert os.listdir(mount.path) == ["logs"]
    with open(os.path.join(mount.path, "logs", "run.txt"), "w") as file:
        file.write("in the subdirectory")
    on_node = trixie_condor_host.exec(["cat", f"{scratch}/out/logs/run.txt"]).stdout
    assert on_node == b"in the subdirectory"


def test_missing_subdir_is_one_line_error(trixie_condor_host, jobs, mountpoint):
    job = jobs()
    wait_for_condor_job(trixie_condor_host, job)
    line = mount_error(trixie_condor_host, f"condor://alice@{trixie_condor_host.host_alias}/{job}:/no-such-dir", mountpoint)
    assert "no-such-dir" in line


def test_shell_fallback_round_trips_hostile_names(trixie_condor_host, jobs):
    job = jobs()
    scratch = wait_for_condor_job(trixie_condor_host, job)
    names = ["two  spaces", "new\nline", "star*", "$(touch pwned)", "quote'single"]

    async def exercise() -> list[str]:
        async with trio.open_nursery() as nursery:
            backend = await connect_condor(
                nursery, job, via_ssh=SshTarget(trixie_condor_host.host_alias, "alice"),
                ssh_command=("ssh", "-F", trixie_condor_host.ssh_config), timeout=CONNECT_LIMIT,
                python="sbxtest-no-such-python",
            )
            try:
                for name in names:
                    [response] = await backend.aupload_files([(f"{scratch}/{name}", name.encode())])
                    assert response.error is None, (name, response.error)
                read = await backend.adownload_files([f"{scratch}/{name}" for name in names])
                assert [response.content for response in read] == [name.encode() for name in names]
                return sorted(entry for entry, _ in await backend.list_dir(scratch))
            finally:
                await backend.aclose()

    listed = trio.run(exercise)
    for name in names:
        assert name in listed
    assert trixie_condor_host.exec(["test", "-e", f"{scratch}/pwned"], check=False).returncode != 0


# This host as the submit node: condor://local/..., run inside the pool's container.


@pytest.fixture
def local_mountpoint(trixie_condor_host):
    """A mount point in alice's home directory in the container; unmounted afterwards if still mounted."""
    path = f"/home/alice/sbxtest-mnt-{uuid.uuid4().hex[:8]}"
    trixie_condor_host.exec(["mkdir", path], user="alice")
    yield path
    trixie_condor_host.exec(["fusermount3", "-u", "-z", path], user="alice", check=False)
    trixie_condor_host.exec(["rmdir", path], user="alice", check=False)


def read_in_job(host, job: str, name: str) -> subprocess.CompletedProcess:
    # ssh's login shell and the job side's eval each remove one layer of quotes.
    return host.ssh(f"condor_ssh_to_job {job} cat {shlex.quote(shlex.quote(name))}", user="alice", check=False)


def mounted_in_container(host, path: str) -> bool:
    mounts = host.exec(["cat", "/proc/self/mounts"]).stdout.decode()
    return any(line.split()[1] == path for line in mounts.splitlines())


def test_local_mount_file_operations(trixie_condor_host, jobs, local_mountpoint):
    host, mnt = trixie_condor_host, local_mountpoint
    job = jobs()
    scratch = wait_for_condor_job(host, job)
    host.exec(["sh", "-c", 'printf "from the job" > "$1/job file.txt"', "sh", scratch], user="alice")

    mounted = host.sandboxfs(["mount", f"condor://local/{job}", mnt])
    assert mounted.returncode == 0, mounted.stderr.decode(errors="replace")
    assert mounted_in_container(host, mnt)

    host.exec(["sh", "-c", 'printf "through the mount" > "$1/new file.txt"', "sh", mnt], user="alice")
    in_job = read_in_job(host, job, "new file.txt")
    assert in_job.returncode == 0, in_job.stderr
    assert in_job.stdout == b"through the mount"
    assert host.exec(["cat", f"{mnt}/new file.txt"], user="alice").stdout == b"through the mount"
    assert host.exec(["cat", f"{mnt}/job file.txt"], user="alice").stdout == b"from the job"

    listing = host.exec(["ls", "-A", mnt], user="alice").stdout.decode().splitlines()
    assert "new file.txt" in listing
    assert "job file.txt" in listing
    assert ".job.ad" in listing

    host.exec(["rm", f"{mnt}/new file.txt"], user="alice")
    assert read_in_job(host, job, "new file.txt").returncode != 0
    assert "new file.txt" not in host.exec(["ls", "-A", scratch]).stdout.decode().splitlines()

    started = time.monotonic()
    unmounted = host.sandboxfs(["umount", mnt])
    assert unmounted.returncode == 0, unmounted.stderr.decode(errors="replace")
    assert time.monotonic() - started < 10
    assert not mounted_in_container(host, mnt)
    assert mnt not in host.sandboxfs(["list"]).stdout.decode()


def test_local_suspended_job_one_line_error(trixie_condor_host, jobs, local_mountpoint):
    host = trixie_condor_host
    job = jobs()
    wait_for_condor_job(host, job)
    host.ssh(f"condor_suspend {job}", user="alice")
    deadline = time.monotonic() + 60
    while condor_job_status(host, job) != "7":
        assert time.monotonic() < deadline, f"job {job} was not suspended within 60 s"
        time.sleep(0.2)

    result = host.sandboxfs(["mount", f"condor://local/{job}", local_mountpoint])

    assert result.returncode == 1, result.stdout
    lines = result.stderr.decode().strip().splitlines()
    assert lines == [f"sandboxfs: error: HTCondor job {job} is suspended: mount it once it runs again"]
    assert not mounted_in_container(host, local_mountpoint)
