"""Fixtures that start the trixie test image: sshd, Apptainer and HTCondor.

`trixie_host` starts one container from SANDBOXFS_TEST_TRIXIE_IMAGE (built by
`scripts/testbed images`) for the session, with sshd on a free loopback port, and
yields a `TrixieHost`. `trixie_condor_host` starts a second container that also
runs an HTCondor personal pool. Both share the host's network, because dockerd
runs with --bridge=none, so every service listens on 127.0.0.1 only.

Use them from a test module or conftest.py with
`pytest_plugins = ["testbed_trixie"]` or by importing the fixtures.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence

import pytest

logger = logging.getLogger(__name__)

IMAGE = os.environ.get("SANDBOXFS_TEST_TRIXIE_IMAGE", "sandboxfs-test/trixie:latest")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repository's sandboxfs package is bind-mounted read-only here, so that
# `python3 -m sandboxfs` runs the working tree's code with the image's Python.
SANDBOXFS_PATH = "/opt/sandboxfs"
# A directory whose htcondor2.py raises ImportError: first on PYTHONPATH, it
# hides HTCondor's Python bindings from sandboxfs.
NO_BINDINGS_PATH = "/opt/sandboxfs-no-bindings"
HOST_ALIAS = "sbxtest-trixie"
INIT_COMMAND = "/usr/local/sbin/sandboxfs-testbed-init"
READY_MARKER = "/run/sandboxfs-testbed-ready"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key.pub"
SIF_DIR = "/opt/sif"
SIF_IMAGES = ("python", "busybox")

# On a 2-CPU VM, sshd started in under a second and the HTCondor pool in about
# 4 s. The limit leaves room for a loaded CI machine.
READY_TIMEOUT = 90.0
READY_POLL_INTERVAL = 0.2

# --privileged fails where the host's capability bounding set lacks
# CAP_SYS_RESOURCE, so the container gets every other capability instead.
# Apptainer, running as root, mounts a SIF image's squashfs through a loop
# device (block major 7). The loop devices are the host's, the init script makes
# their nodes in the container's /dev, and each one detaches when the instance's
# mount is gone. /dev/fuse lets sandboxfs mount inside the container.
CONTAINER_FLAGS = (
    "--network",
    "host",
    "--cap-add",
    "ALL",
    "--cap-drop",
    "SYS_RESOURCE",
    "--security-opt",
    "seccomp=unconfined",
    "--device",
    "/dev/loop-control",
    "--device-cgroup-rule",
    "b 7:* rwm",
    "--device",
    "/dev/fuse",
)


def docker(*args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, check=check, input=input)


# NOTE: another process can take the port between this close and sshd's bind.
# The container then exits, and the fixture fails with sshd's error in its log.
def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def generate_key_pair(directory: str) -> str:
    """Create an ed25519 key pair without a passphrase in directory and return the private key's path."""
    key = os.path.join(directory, "id_ed25519")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sandboxfs-test", "-f", key],
        check=True,
        capture_output=True,
    )
    return key


class TrixieHost:
    """A running trixie test container, reachable by `docker exec` and by ssh.

    `ssh -F host.ssh_config host.host_alias CMD` runs CMD as root, and
    `USER@host_alias` logs in as another user, such as alice (uid 1000).
    """

    def __init__(self, name: str, ssh_port: int, state_dir: str, key: str, condor: bool) -> None:
        self.name = name
        self.ssh_port = ssh_port
        self.state_dir = state_dir
        self.key = key
        self.condor = condor
        self.host_alias = HOST_ALIAS
        self.ssh_config = os.path.join(state_dir, "ssh_config")
        self.known_hosts = os.path.join(state_dir, "known_hosts")

    def exec(
        self, argv: Sequence[str], user: str | None = None, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess:
        """Run argv in the container with `docker exec`, as user (default root).

        Raises AssertionError with the command's stderr if check is set and it fails.
        """
        prefix = ["exec", "-i"] + (["--user", user] if user else [])
        result = docker(*prefix, self.name, *argv, check=False, input=input)
        if check and result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            raise AssertionError(f"in {self.name}: {list(argv)!r} failed ({result.returncode}): {stderr}")
        return result

    def ssh(self, command: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run command through ssh with this host's ssh config, as user (default root)."""
        destination = f"{user}@{self.host_alias}" if user else self.host_alias
        result = subprocess.run(["ssh", "-F", self.ssh_config, destination, command], capture_output=True)
        if check and result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            raise AssertionError(f"ssh {destination} {command!r} failed ({result.returncode}): {stderr}")
        return result

    def start_instance(
        self, image: str, name: str, writable_tmpfs: bool = True, binds: Sequence[str] = ()
    ) -> None:
        """Start Apptainer instance name from /opt/sif/IMAGE.sif as root and return once it runs.

        image is "python" (python3 present) or "busybox" (no python3). Each bind is
        an `apptainer --bind` value such as "/srv/data:/data". With writable_tmpfs,
        writes anywhere in the instance go to a tmpfs overlay that is lost when it stops.
        """
        if image not in SIF_IMAGES:
            raise ValueError(f"unknown SIF image {image!r}; expected one of {SIF_IMAGES}")
        argv = ["apptainer", "instance", "start"]
        if writable_tmpfs:
            argv.append("--writable-tmpfs")
        for bind in binds:
            argv += ["--bind", bind]
        argv += [f"{SIF_DIR}/{image}.sif", name]

        self.exec(argv)
        # `instance start` returns after the instance's process started. This
        # check shows that commands can enter it.
        self.exec(["apptainer", "exec", f"instance://{name}", "true"])
        logger.info("started Apptainer instance %s from %s.sif in %s", name, image, self.name)

    def stop_instance(self, name: str) -> None:
        """Stop Apptainer instance name. Raises AssertionError if `apptainer instance stop` fails."""
        self.exec(["apptainer", "instance", "stop", name])
        logger.info("stopped Apptainer instance %s in %s", name, self.name)

    def sandboxfs(
        self, argv: Sequence[str], user: str = "alice", bindings: bool = True, env: Sequence[str] = ()
    ) -> subprocess.CompletedProcess:
        """Run `python3 -m sandboxfs ARGV` in the container as `user`, in its home directory.

        With bindings False, htcondor2 cannot be imported. Each `env` item is
        a NAME=VALUE for the command's environment. The result's output is bytes.
        """
        path = SANDBOXFS_PATH
        if not bindings:
            self.exec(["sh", "-c", 'mkdir -p "$1" && echo "raise ImportError(\'hidden by the test\')" > "$1/htcondor2.py"',
                       "sh", NO_BINDINGS_PATH])
            path = f"{NO_BINDINGS_PATH}:{SANDBOXFS_PATH}"
        variables = [f"PYTHONPATH={path}", *env]
        return self.exec(["sh", "-c", 'cd && exec env "$@"', "sh", *variables, "python3", "-m", "sandboxfs", *argv],
                         user=user, check=False)

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return (result.stdout + result.stderr).decode(errors="replace")


def run_container(name: str, ssh_port: int, public_key: str, condor_port: int | None) -> None:
    env = ["-e", f"SSH_PORT={ssh_port}", "-e", f"AUTHORIZED_KEY={public_key}"]
    if condor_port is not None:
        env += ["-e", "START_CONDOR=1", "-e", f"CONDOR_PORT={condor_port}"]
    source = ["--volume", f"{REPO}/sandboxfs:{SANDBOXFS_PATH}/sandboxfs:ro"]
    result = docker("run", "-d", "--name", name, *CONTAINER_FLAGS, *source, *env, IMAGE, INIT_COMMAND, check=False)
    if result.returncode != 0:
        pytest.fail(
            f"could not start a container from {IMAGE}: {result.stderr.decode(errors='replace').strip()} "
            "(run scripts/testbed images)"
        )


def container_running(name: str) -> bool:
    result = docker("inspect", "--format", "{{.State.Running}}", name, check=False)
    return result.stdout.strip() == b"true"


def wait_until_ready(host: TrixieHost) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while host.exec(["test", "-e", READY_MARKER], check=False).returncode != 0:
        if not container_running(host.name):
            pytest.fail(f"container {host.name} exited during start-up; its log:\n{host.logs()}")
        if time.monotonic() >= deadline:
            pytest.fail(f"container {host.name} was not ready within {READY_TIMEOUT:.0f} s; its log:\n{host.logs()}")
        time.sleep(READY_POLL_INTERVAL)


def write_ssh_files(host: TrixieHost) -> None:
    """Write known_hosts with the image's host key, and an ssh config that checks it."""
    host_key = host.exec(["cat", HOST_KEY]).stdout.decode().split()
    with open(host.known_hosts, "w", encoding="utf-8") as file:
        file.write(f"[127.0.0.1]:{host.ssh_port} {host_key[0]} {host_key[1]}\n")

    # ControlPersist keeps one connection per user open, so each ssh call in a
    # test skips the handshake. The socket path stays short (%C is 40 hex digits).
    with open(host.ssh_config, "w", encoding="utf-8") as file:
        file.write(
            f"Host {host.host_alias}\n"
            "    HostName 127.0.0.1\n"
            f"    Port {host.ssh_port}\n"
            "    User root\n"
            f"    IdentityFile {host.key}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {host.known_hosts}\n"
            "    StrictHostKeyChecking yes\n"
            "    BatchMode yes\n"
            "    ControlMaster auto\n"
            f"    ControlPath {host.state_dir}/cm-%C\n"
            "    ControlPersist 60\n"
            "    LogLevel ERROR\n"
        )


def close_ssh_masters(host: TrixieHost) -> None:
    for destination in (host.host_alias, f"alice@{host.host_alias}"):
        subprocess.run(["ssh", "-F", host.ssh_config, "-O", "exit", destination], capture_output=True)


def start_host(condor: bool) -> Iterator[TrixieHost]:
    """Start a trixie container, yield it once it is ready, then remove it."""
    state_dir = tempfile.mkdtemp(prefix="sbxtest-trixie-")
    key = generate_key_pair(state_dir)
    with open(key + ".pub", encoding="utf-8") as file:
        public_key = file.read().strip()

    name = f"sbxtest-trixie-{uuid.uuid4().hex[:10]}"
    host = TrixieHost(name, free_loopback_port(), state_dir, key, condor)
    condor_port = free_loopback_port() if condor else None
    try:
        run_container(name, host.ssh_port, public_key, condor_port)
        wait_until_ready(host)
        write_ssh_files(host)
        logger.info("trixie container %s is ready; sshd on 127.0.0.1:%d", name, host.ssh_port)
        yield host
    finally:
        close_ssh_masters(host)
        docker("rm", "-f", name, check=False)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def trixie_host() -> Iterator[TrixieHost]:
    """A trixie container with sshd and Apptainer, for the whole session."""
    yield from start_host(condor=False)


@pytest.fixture(scope="session")
def trixie_condor_host() -> Iterator[TrixieHost]:
    """A trixie container that also runs an HTCondor personal pool with one execute slot.

    Submit jobs as alice. A job runs in a scratch directory under
    /var/lib/condor/execute only if its submit file sets
    `should_transfer_files = yes`. Otherwise it runs in the submit directory,
    because the pool shares one filesystem with the submit node.
    """
    yield from start_host(condor=True)
