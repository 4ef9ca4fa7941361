"""Fixtures: real sandboxes, real mounts.

`sandbox` is parametrized by backend: a host directory (`local`), a Debian
container with python3 (the agent path) and a busybox container without it
(the shell fallback). Each backend is mounted once per session through the
`sandboxfs` command; each test gets a fresh directory in it (`workdir`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

# The trixie test container, which runs Apptainer and HTCondor.
from testbed_trixie import TrixieHost, trixie_condor_host, trixie_host  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBIAN_IMAGE = os.environ.get("SANDBOXFS_TEST_DEBIAN_IMAGE", "sandboxfs-test/debian:latest")
BUSYBOX_IMAGE = os.environ.get("SANDBOXFS_TEST_BUSYBOX_IMAGE", "sandboxfs-test/busybox:latest")
BACKENDS = [
    "local",
    "docker-debian",
    "docker-busybox",
    "apptainer-python",
    "apptainer-busybox",
    "apptainer-ssh-python",
    "apptainer-ssh-busybox",
    "condor-python",
]


def sandboxfs(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the sandboxfs command as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "sandboxfs", *args], capture_output=True, text=True, cwd=REPO, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(f"sandboxfs {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def docker(*args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, check=check, input=input)


class Mount:
    """A sandboxfs mount started with the command line; unmounted by `close`."""

    def __init__(self, source: str, *options: str) -> None:
        self.source = source
        self.path = tempfile.mkdtemp(prefix="sbxtest-mnt-")
        self.state = tempfile.mkdtemp(prefix="sbxtest-state-")
        self.log_file = os.path.join(self.state, "mount.log")
        self.recovery_dir = os.path.join(self.state, "recovery")
        sandboxfs(
            "mount",
            "--log-file",
            self.log_file,
            "--recovery-dir",
            self.recovery_dir,
            *options,
            source,
            self.path,
            env={**os.environ, "XDG_STATE_HOME": self.state},
        )

    def log(self) -> str:
        with open(self.log_file, encoding="utf-8", errors="replace") as file:
            return file.read()

    def close(self) -> None:
        result = sandboxfs("umount", self.path, check=False)
        if result.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)
        os.rmdir(self.path)
        shutil.rmtree(self.state, ignore_errors=True)


class Sandbox:
    """One sandbox: where its files are, and how to run a command inside it.

    `prefix` is the argv that runs a command in the sandbox (None: on the
    host). For a container, it is built from the container's name.
    """

    def __init__(
        self,
        kind: str,
        root: str,
        container: str | None = None,
        prefix: list[str] | None = None,
        source: str | None = None,
        mount_options: tuple[str, ...] = (),
    ) -> None:
        self.kind = kind
        self.mount_options = mount_options
        self.root = root
        self.container = container
        self.prefix = prefix
        if prefix is None and container is not None:
            self.prefix = ["docker", "exec", "-i", container]
        self._source = source

    @property
    def source(self) -> str:
        if self._source is not None:
            return self._source
        if self.container is None:
            return f"local://{self.root}"
        return f"docker://{self.container}:{self.root}"

    def run(
        self, script: str, *args: str, user: str | None = None, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess:
        """Run `sh -c script sh args...` in the sandbox; args never enter the script text."""
        argv = ["sh", "-c", script, "sh", *args]
        if self.prefix is None:
            result = subprocess.run(argv, capture_output=True, input=input)
        else:
            prefix = self.prefix
            if user:
                prefix = ["docker", "exec", "-i", "--user", user, self.container]
            result = subprocess.run(prefix + argv, capture_output=True, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"in {self.kind}: {script!r} {args!r} failed: {result.stderr!r}")
        return result

    def read(self, path: str) -> bytes:
        return self.run('cat -- "$1"', path).stdout

    def write(self, path: str, data: bytes) -> None:
        self.run('cat > "$1"', path, input=data)


def _start_container(image: str, *extra: str) -> str:
    name = f"sbxtest-{uuid.uuid4().hex[:10]}"
    result = docker("run", "-d", "--name", name, *extra, image, "sleep", "infinity", check=False)
    if result.returncode != 0:
        pytest.fail(f"could not start a container from {image}: {result.stderr.decode().strip()} (run scripts/testbed images)")
    return name


@pytest.fixture(scope="session")
def containers():
    """Start containers on first use; remove each one this session started."""
    started: dict[str, str] = {}

    def get(image: str, *extra: str, key: str | None = None) -> str:
        key = key or image
        if key not in started:
            started[key] = _start_container(image, *extra)
        return started[key]

    yield get
    for name in started.values():
        docker("rm", "-f", name, check=False)


@pytest.fixture
def new_container():
    """Start fresh containers for one test: new_container(image, *docker_run_options)."""
    names: list[str] = []

    def start(image: str, *extra: str) -> str:
        names.append(_start_container(image, *extra))
        return names[-1]

    yield start
    for name in names:
        docker("rm", "-f", name, check=False)


@pytest.fixture
def mount_of():
    """Mount sources for one test: mount_of(source, *options); unmounted afterwards."""
    made: list[Mount] = []

    def make(source: str, *options: str) -> Mount:
        made.append(Mount(source, *options))
        return made[-1]

    yield make
    for mount in made:
        mount.close()


@pytest.fixture
def mountpoint():
    """An empty directory to mount on; unmounted lazily and removed afterwards."""
    path = tempfile.mkdtemp(prefix="sbxtest-mnt-")
    yield path
    subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
    os.rmdir(path)


@pytest.fixture(scope="session")
def local_root():
    root = tempfile.mkdtemp(prefix="sbxtest-local-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def apptainer_shim(host: TrixieHost) -> str:
    """Write an `apptainer` command for the host that runs the test container's.

    Apptainer 1.4 needs a newer glibc than this host has, so it runs in the
    trixie container; the backend runs this command as it would run a local
    `apptainer`, with the same arguments and pipes.
    """
    path = os.path.join(host.state_dir, "apptainer")
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as file:
            file.write(f'#!/bin/sh\nexec docker exec -i {host.name} apptainer "$@"\n')
        os.chmod(path, 0o755)
    return path


def start_apptainer_sandbox(kind: str, host: TrixieHost, **instance_options) -> Sandbox:
    """Start an instance with a host directory bound on /workspace; return its Sandbox.

    `kind` is apptainer[-ssh]-IMAGE: the mount reaches the instance through the
    local `apptainer` command, or through ssh to the test container.
    """
    image = kind.rsplit("-", 1)[1]
    instance = f"sbx-{kind}-{uuid.uuid4().hex[:6]}"
    host.exec(["mkdir", "-p", f"/srv/{instance}"])
    instance_options.setdefault("binds", [f"/srv/{instance}:/workspace"])
    host.start_instance(image, instance, **instance_options)
    prefix = ["docker", "exec", "-i", host.name, "apptainer", "exec", f"instance://{instance}"]
    if "-ssh-" in kind:
        source = f"apptainer://{instance}:/workspace?via=ssh://{host.host_alias}"
        options = ("--ssh-command", f"ssh -F {host.ssh_config}")
    else:
        source = f"apptainer://{instance}:/workspace"
        options = ("--apptainer", apptainer_shim(host))
    sandbox = Sandbox(kind, "/workspace", prefix=prefix, source=source, mount_options=options)
    sandbox.instance = instance
    return sandbox


def submit_condor_job(host: TrixieHost, executable: str = "/bin/sleep", arguments: str = "3600") -> str:
    """Submit a vanilla job as alice and return its id CLUSTER.PROC.

    The job gets a scratch directory under /var/lib/condor/execute because
    it transfers files (see `trixie_condor_host`).
    """
    description = (
        f"executable = {executable}\n"
        f"arguments = {arguments}\n"
        "should_transfer_files = yes\n"
        "when_to_transfer_output = ON_EXIT\n"
        "queue\n"
    )
    path = f"/tmp/sbxtest-{uuid.uuid4().hex[:8]}.sub"
    host.exec(["sh", "-c", 'cat > "$1"', "sh", path], user="alice", input=description.encode())
    output = host.ssh(f"condor_submit -terse {path}", user="alice").stdout.decode()
    # -terse prints "FIRST - LAST", such as "7.0 - 7.0".
    return output.split()[0]


def condor_job_status(host: TrixieHost, job: str) -> str:
    """Return the job's JobStatus as condor_q prints it, or "" once it left the queue."""
    return host.ssh(f"condor_q {job} -af JobStatus", user="alice").stdout.decode().strip()


def wait_for_condor_job(host: TrixieHost, job: str, timeout: float = 60.0) -> str:
    """Wait until the job runs; return its scratch directory."""
    deadline = time.monotonic() + timeout
    while condor_job_status(host, job) != "2":
        if time.monotonic() >= deadline:
            pytest.fail(f"HTCondor job {job} did not run within {timeout:.0f} s")
        time.sleep(0.2)
    output = host.ssh(f"condor_ssh_to_job -auto-retry {job} printenv _CONDOR_SCRATCH_DIR", user="alice").stdout
    return output.decode().strip()


def start_condor_sandbox(kind: str, host: TrixieHost) -> Sandbox:
    """Submit a `sleep 3600` job as alice and return the Sandbox of its scratch directory.

    The mount goes through ssh to the test container as alice, then
    condor_ssh_to_job. Test-side commands reach the same directory with
    `docker exec` as alice, which is faster.
    """
    job = submit_condor_job(host)
    scratch = wait_for_condor_job(host, job)
    prefix = ["docker", "exec", "-i", "--user", "alice", host.name]
    source = f"condor://alice@{host.host_alias}/{job}"
    options = ("--ssh-command", f"ssh -F {host.ssh_config}")
    sandbox = Sandbox(kind, scratch, prefix=prefix, source=source, mount_options=options)
    sandbox.job = job
    return sandbox


def make_sandbox(kind: str, containers, local_root: str, request) -> Sandbox:
    if kind == "local":
        return Sandbox(kind, local_root)
    if kind.startswith("apptainer"):
        return start_apptainer_sandbox(kind, request.getfixturevalue("trixie_host"))
    if kind.startswith("condor"):
        host = request.getfixturevalue("trixie_condor_host")
        sandbox = start_condor_sandbox(kind, host)
        # Runs before the test container is removed, which is set up later.
        request.addfinalizer(lambda: host.ssh(f"condor_rm {sandbox.job}", user="alice", check=False))
        return sandbox
    image = DEBIAN_IMAGE if kind == "docker-debian" else BUSYBOX_IMAGE
    return Sandbox(kind, "/workspace", containers(image))


@pytest.fixture(scope="session")
def mounts(containers, local_root, request):
    """One mount per backend for the session, made on first use."""
    made: dict[str, tuple[Sandbox, Mount]] = {}

    def get(kind: str) -> tuple[Sandbox, Mount]:
        if kind not in made:
            sandbox = make_sandbox(kind, containers, local_root, request)
            made[kind] = (sandbox, Mount(sandbox.source, *sandbox.mount_options))
        return made[kind]

    yield get
    for _, mount in made.values():
        mount.close()


@pytest.fixture(params=BACKENDS)
def backend_kind(request) -> str:
    return request.param


class Workdir:
    """A fresh directory: `mnt` is its path through the mount, `inside` in the sandbox."""

    def __init__(self, sandbox: Sandbox, mount: Mount, name: str) -> None:
        self.sandbox = sandbox
        self.mount = mount
        self.mnt = os.path.join(mount.path, name)
        self.inside = f"{sandbox.root}/{name}"


@pytest.fixture
def workdir(backend_kind, mounts) -> Workdir:
    sandbox, mount = mounts(backend_kind)
    name = f"t-{uuid.uuid4().hex[:8]}"
    sandbox.run('mkdir -m 777 -- "$1"', f"{sandbox.root}/{name}")
    return Workdir(sandbox, mount, name)
