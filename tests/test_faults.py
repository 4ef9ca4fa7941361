"""Faults on real sandboxes: the errors a program gets, and that the mount comes back.

Each test makes its own mount, so that the fault it causes reaches no other
test. Connections are dropped by killing processes this mount started: its
helper in a fresh container, or its own child processes on the host (the
local helper, the `apptainer exec` client, ssh and its master connection).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import BUSYBOX_IMAGE, DEBIAN_IMAGE, Mount, Sandbox, docker, sandboxfs
from sandboxfs.mount import mounted, pid_alive

IMAGES = {"debian": DEBIAN_IMAGE, "busybox": BUSYBOX_IMAGE}
MiB = 1 << 20
# A file larger than the kernel's readahead, so a read far into it reaches
# the mount instead of the page cache.
BIG = bytes(range(256)) * (4 * MiB // 256)
# How long the mount may take to notice a sandbox that is back: the longest
# delay between two tries to connect, and a margin for a busy machine.
RECOVERY_LIMIT = 40.0
# The backends with a connection that lasts across requests, and so can lose it.
CONNECTED_KINDS = [
    "local",
    "docker-debian",
    "apptainer-python",
    "apptainer-ssh-python",
    "condor-python",
]


@pytest.fixture(params=sorted(IMAGES))
def image(request) -> str:
    return IMAGES[request.param]


def status_of(mount: Mount) -> tuple[int, str]:
    """Return the mount's server pid and its status as `sandboxfs list` shows it."""
    info = next(info for info in mounted() if info.mountpoint == mount.path)
    return info.pid, info.status


def errno_of(call, *args) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


def wait_until(check, limit: float = RECOVERY_LIMIT, what: str = "the mount to recover"):
    """Call `check` until it returns without OSError; return its result."""
    deadline = time.monotonic() + limit
    while True:
        try:
            return check()
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what} after {limit} s") from None
            time.sleep(0.2)


def children_of(pid: int) -> list[int]:
    """Return the child processes of `pid`, from every thread's list."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as file:
                found.extend(int(child) for child in file.read().split())
        except FileNotFoundError:
            continue  # the thread ended
    return found


def kill_children(pid: int) -> list[int]:
    """SIGKILL the mount server's child processes; return their pids once they are gone."""
    children = children_of(pid)
    assert children, f"the mount server {pid} has no child process to kill"
    for child in children:
        os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(child in children_of(pid) for child in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    return children


def kill_agent_in(container: str) -> None:
    """SIGKILL the sandboxfs helper running in a container this test started."""
    # The bracket keeps grep's own command line from matching.
    docker(
        "exec", container, "sh", "-c",
        "for f in $(grep -l 'sandboxfs-agen[t]' /proc/[0-9]*/cmdline); do p=${f#/proc/}; kill -9 ${p%/cmdline}; done",
    )


def drop_connection(kind: str, mount: Mount, sandbox: Sandbox) -> None:
    if kind.startswith("docker-"):
        kill_agent_in(sandbox.container)
    else:
        pid, _ = status_of(mount)
        kill_children(pid)


def write_big(path: str) -> None:
    with open(path, "wb") as file:
        file.write(BIG)


# A lost connection.


@pytest.mark.parametrize("kind", CONNECTED_KINDS)
def test_lost_connection_comes_back_by_itself(kind, mounts):
    sandbox, _ = mounts(kind)
    mount = Mount(sandbox.source, *sandbox.mount_options)
    try:
        directory = os.path.join(mount.path, f"fault-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(directory)
        write_big(os.path.join(directory, "big"))
        held = open(os.path.join(directory, "big"), "rb")
        assert held.read(4096) == BIG[:4096]

        drop_connection(kind, mount, sandbox)

        # The next requests connect again; none of them fails.
        assert sorted(os.listdir(directory)) == ["big"]
        with open(os.path.join(directory, "after"), "wb") as file:
            file.write(b"written after the fault")
        # A file opened before the fault may have changed meanwhile: EIO, not old data.
        assert errno_of(os.pread, held.fileno(), 4096, 3 * MiB) == errno.EIO
        held.close()
        with open(os.path.join(directory, "big"), "rb") as file:
            assert file.read() == BIG
        assert sandbox.read(f"{sandbox.root}/{os.path.basename(directory)}/after") == b"written after the fault"
        assert status_of(mount)[1] == "ok"
        assert "connected to the sandbox again" in mount.log()
    finally:
        mount.close()


def test_helper_killed_during_upload_is_sent_again(new_container, mount_of):
    name = new_container(DEBIAN_IMAGE)
    sandbox = Sandbox("docker", "/tmp", name)
    mount = mount_of(f"docker://{name}:/tmp")
    data = os.urandom(64 * MiB)
    file = open(os.path.join(mount.path, "upload"), "wb")
    file.write(data)
    killer = threading.Timer(0.3, kill_agent_in, (name,))
    killer.start()
    try:
        file.close()  # the upload runs here, and the helper dies during it
    finally:
        killer.join()
    assert sandbox.read("/tmp/upload") == data
    assert not os.path.isdir(mount.recovery_dir) or os.listdir(mount.recovery_dir) == []


# The container goes away and comes back.


def test_restarted_container_is_reconnected(image, new_container, mount_of):
    name = new_container(image)
    sandbox = Sandbox("docker", "/workspace", name)
    sandbox.run("mkdir -p /workspace && printf kept > /workspace/before")
    mount = mount_of(f"docker://{name}:/workspace", "--attr-timeout", "0", "--entry-timeout", "0")
    assert os.listdir(mount.path) == ["before"]

    docker("restart", "-t", "0", name)

    assert wait_until(lambda: sorted(os.listdir(mount.path))) == ["before"]
    with open(os.path.join(mount.path, "before")) as file:
        assert file.read() == "kept"
    with open(os.path.join(mount.path, "after"), "w") as file:
        file.write("new")
    assert sandbox.read("/workspace/after") == b"new"
    assert status_of(mount)[1] == "ok"


def test_stopped_container_fails_fast_then_recovers_when_started(image, new_container, mount_of):
    name = new_container(image)
    sandbox = Sandbox("docker", "/workspace", name)
    sandbox.run("mkdir -p /workspace && printf data > /workspace/f")
    mount = mount_of(f"docker://{name}:/workspace", "--attr-timeout", "0", "--entry-timeout", "0")
    assert os.listdir(mount.path) == ["f"]

    docker("stop", "-t", "0", name)
    for _ in range(3):
        started = time.monotonic()
        assert errno_of(os.listdir, mount.path) in (errno.ENOTCONN, errno.EIO)
        assert time.monotonic() - started < 15
    _, status = status_of(mount)
    assert status.startswith("broken:")
    assert name in status

    docker("start", name)
    assert wait_until(lambda: os.listdir(mount.path)) == ["f"]
    assert status_of(mount)[1] == "ok"


# A sandbox that stops replying.


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as file:
        return file.read().rsplit(")", 1)[1].split()[0]


def test_frozen_sandbox_eio_then_recovers(image, new_container, mount_of):
    name = new_container(image)
    Sandbox("docker", "/tmp", name).run("printf data > /tmp/f")
    mount = mount_of(f"docker://{name}:/tmp", "--timeout", "3", "--attr-timeout", "0", "--entry-timeout", "0")
    assert "f" in os.listdir(mount.path)

    docker("pause", name)
    try:
        started = time.monotonic()
        reader = subprocess.Popen(["cat", os.path.join(mount.path, "f")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1)
        if reader.poll() is None:
            # Waiting on the mount, but in an interruptible sleep: it can be killed.
            assert process_state(reader.pid) == "S"
        _, stderr = reader.communicate(timeout=30)
        elapsed = time.monotonic() - started
        assert reader.returncode != 0
        assert b"Input/output error" in stderr or b"not connected" in stderr
        assert elapsed < 3 + 15
        # While the sandbox stays frozen, requests fail rather than wait.
        started = time.monotonic()
        assert errno_of(os.listdir, mount.path) in (errno.ENOTCONN, errno.EIO)
        assert time.monotonic() - started < 3 + 15
    finally:
        docker("unpause", name)
    assert "f" in wait_until(lambda: os.listdir(mount.path))
    with open(os.path.join(mount.path, "f")) as file:
        assert file.read() == "data"


# A full disk in the sandbox.


def test_full_disk_enospc_keeps_data(image, new_container, mount_of):
    name = new_container(image, "--tmpfs", "/small:size=1m")
    sandbox = Sandbox("docker", "/small", name)
    mount = mount_of(f"docker://{name}:/small")
    data = os.urandom(2 * MiB)

    fd = os.open(os.path.join(mount.path, "too-big"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, data) == len(data)  # staged on the host: the sandbox is not asked yet
        assert errno_of(os.fsync, fd) == errno.ENOSPC
    finally:
        assert errno_of(os.close, fd) == errno.ENOSPC

    kept = [entry for entry in os.listdir(mount.recovery_dir) if not entry.endswith(".source")]
    assert len(kept) == 1
    with open(os.path.join(mount.recovery_dir, kept[0]), "rb") as copy:
        assert copy.read() == data
    assert "too-big" in mount.log()
    assert kept[0] in mount.log()

    # Once there is room, writes work again.
    sandbox.run("rm -f /small/too-big")
    with open(os.path.join(mount.path, "fits"), "wb") as file:
        file.write(data[: 256 * 1024])
    assert sandbox.read("/small/fits") == data[: 256 * 1024]


# Unmounting with a file open and written.


def test_lazy_fusermount_with_open_file_uploads_at_close(new_container, mount_of):
    name = new_container(DEBIAN_IMAGE)
    mount = mount_of(f"docker://{name}:/tmp")
    pid, _ = status_of(mount)
    file = open(os.path.join(mount.path, "pending"), "wb")
    file.write(b"written before the unmount")
    file.flush()

    subprocess.run(["fusermount3", "-u", "-z", mount.path], check=True)
    assert not os.path.ismount(mount.path)
    file.close()  # the file system is detached but still serves this file

    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the mount server did not exit after the lazy unmount"
    assert Sandbox("docker", "/tmp", name).read("/tmp/pending") == b"written before the unmount"


def test_umount_with_open_file_refuses_and_loses_nothing(new_container, mount_of):
    name = new_container(DEBIAN_IMAGE)
    mount = mount_of(f"docker://{name}:/tmp")
    file = open(os.path.join(mount.path, "pending"), "wb")
    try:
        file.write(b"still open")
        file.flush()
        result = sandboxfs("umount", mount.path, check=False)
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1
        assert "busy" in result.stderr
        assert "--lazy" in result.stderr
        assert os.path.ismount(mount.path)
    finally:
        file.close()
    assert Sandbox("docker", "/tmp", name).read("/tmp/pending") == b"still open"


def test_umount_returns_while_another_namespace_keeps_a_copy(new_container, mount_of):
    name = new_container(DEBIAN_IMAGE)
    mount = mount_of(f"docker://{name}:/tmp")
    pid, _ = status_of(mount)
    # A new mount namespace copies every mount, this one included, and keeps
    # the FUSE connection open after the mount is gone from ours.
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "300"])
    try:
        time.sleep(0.5)
        with open(os.path.join(mount.path, "f"), "w") as file:
            file.write("written before the unmount")
        started = time.monotonic()
        sandboxfs("umount", mount.path)
        assert time.monotonic() - started < 15
        assert not pid_alive(pid)
    finally:
        holder.kill()
        holder.wait()
    assert Sandbox("docker", "/tmp", name).read("/tmp/f") == b"written before the unmount"
