"""Docker mounts with their own containers: users, read-only containers,
failed uploads, and the command line's errors.

Each case runs on both images: Debian (the agent) and busybox (the shell
fallback).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import BUSYBOX_IMAGE, DEBIAN_IMAGE, REPO, Sandbox, docker, sandboxfs

IMAGES = {"debian": DEBIAN_IMAGE, "busybox": BUSYBOX_IMAGE}


@pytest.fixture(params=sorted(IMAGES))
def image(request) -> str:
    return IMAGES[request.param]


@pytest.fixture
def container(image, new_container):
    """Start a fresh container of the test's image: container(*docker_run_options)."""
    return lambda *extra: new_container(image, *extra)


def errno_of(call, *args) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


def test_sandbox_user_permission_gives_eacces(container, mount_of):
    name = container()
    sandbox = Sandbox("docker", "/workspace", name)
    sandbox.run(
        'umask 077; printf secret > /workspace/secret; mkdir /workspace/private; '
        'mkdir -m 755 /workspace/readonly-dir'
    )
    mount = mount_of(f"docker://alice@{name}:/workspace")

    assert errno_of(open, os.path.join(mount.path, "secret"), "rb") == errno.EACCES
    assert errno_of(os.listdir, os.path.join(mount.path, "private")) == errno.EACCES
    assert errno_of(open, os.path.join(mount.path, "readonly-dir", "new"), "w") == errno.EACCES

    with open(os.path.join(mount.path, "mine"), "w") as file:
        file.write("alice's")
    owner = sandbox.run("stat -c %u /workspace/mine").stdout.strip()
    assert owner == b"1000"


def test_read_only_container_gives_erofs(container, mount_of):
    name = container("--read-only")
    mount = mount_of(f"docker://{name}:/workspace")

    assert errno_of(open, os.path.join(mount.path, "new"), "w") == errno.EROFS
    assert errno_of(os.mkdir, os.path.join(mount.path, "dir")) == errno.EROFS
    assert os.listdir(mount.path) == []


def test_read_only_mount_gives_erofs(container, mount_of):
    name = container()
    Sandbox("docker", "/workspace", name).run("printf keep > /workspace/f")
    mount = mount_of(f"docker://{name}:/workspace", "--read-only")

    with open(os.path.join(mount.path, "f")) as file:
        assert file.read() == "keep"
    assert errno_of(open, os.path.join(mount.path, "f"), "w") == errno.EROFS
    assert errno_of(os.unlink, os.path.join(mount.path, "f")) == errno.EROFS


def test_failed_upload_gives_eio_and_keeps_data(container, mount_of):
    name = container()
    sandbox = Sandbox("docker", "/workspace", name)
    mount = mount_of(f"docker://alice@{name}:/workspace")
    data = b"precious bytes\n" * 1000

    file = open(os.path.join(mount.path, "report.txt"), "wb")
    # The sandbox takes the file away from alice before the upload.
    sandbox.run("chown root /workspace/report.txt; chmod 600 /workspace/report.txt")
    file.write(data)
    with pytest.raises(OSError) as info:
        file.close()
    assert info.value.errno == errno.EIO

    kept = [entry for entry in os.listdir(mount.recovery_dir) if not entry.endswith(".source")]
    assert len(kept) == 1
    with open(os.path.join(mount.recovery_dir, kept[0]), "rb") as copy:
        assert copy.read() == data
    assert os.path.join(mount.recovery_dir, kept[0]) in mount.log()
    # `sandboxfs list` names what waits in the mount's recovery directory.
    listing = sandboxfs("list").stdout
    assert f"kept in {mount.recovery_dir}" in listing
    assert f"{kept[0]}  {len(data)} bytes from /workspace/report.txt" in listing


def test_whole_container_root(container, mount_of):
    name = container()
    mount = mount_of(f"docker://{name}")
    assert {"etc", "bin", "workspace"} <= set(os.listdir(mount.path))
    with open(os.path.join(mount.path, "etc", "passwd")) as file:
        assert "alice" in file.read()


def test_mount_errors_are_one_line(container, mountpoint, image):
    stopped = container()
    docker("stop", "-t", "0", stopped)
    cases = {
        "docker://sbxtest-no-such-container": "sbxtest-no-such-container",
        f"docker://{stopped}": "not running",
        f"docker://{container()}:/no/such/dir": "/no/such/dir",
        "docker://x": "invalid container name",
        "ftp://host/dir": "unknown source type",
        "docker://-rm": "invalid container name",
    }
    for source, expected in cases.items():
        result = sandboxfs("mount", source, mountpoint, check=False)
        assert result.returncode == 1, source
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert expected in lines[0]
        assert os.listdir(mountpoint) == []


def test_mount_point_errors(container, tmp_path):
    name = container()
    missing = tmp_path / "missing"
    result = sandboxfs("mount", f"docker://{name}", str(missing), check=False)
    assert result.returncode == 1
    assert "does not exist" in result.stderr

    plain = tmp_path / "plain"
    plain.write_text("")
    result = sandboxfs("mount", f"docker://{name}", str(plain), check=False)
    assert result.returncode == 1
    assert "not a directory" in result.stderr


def test_busy_mount_point_and_list_and_umount(container, mount_of):
    name = container()
    mount = mount_of(f"docker://{name}:/workspace")

    again = sandboxfs("mount", f"docker://{name}", mount.path, check=False)
    assert again.returncode == 1
    assert "busy" in again.stderr

    listing = sandboxfs("list").stdout
    assert mount.path in listing
    assert f"docker://{name}:/workspace" in listing

    handle = open(os.path.join(mount.path, "open-file"), "w")
    try:
        busy = sandboxfs("umount", mount.path, check=False)
        assert busy.returncode == 1
        assert "busy" in busy.stderr
    finally:
        handle.close()

    sandboxfs("umount", mount.path)
    assert mount.path not in sandboxfs("list").stdout
    not_mounted = sandboxfs("umount", mount.path, check=False)
    assert not_mounted.returncode == 1
    assert "not a sandboxfs mount point" in not_mounted.stderr


def test_foreground_mount_ends_on_fusermount(container, mountpoint):
    name = container()
    process = subprocess.Popen(
        [sys.executable, "-m", "sandboxfs", "mount", "--foreground", f"docker://{name}:/workspace", mountpoint],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mountpoint):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "mount did not appear within 60 s"
            time.sleep(0.05)
        with open(os.path.join(mountpoint, "fg"), "w") as file:
            file.write("foreground")
        subprocess.run(["fusermount3", "-u", mountpoint], check=True)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    assert Sandbox("docker", "/workspace", name).read("/workspace/fg") == b"foreground"


def test_sigterm_uploads_open_file_then_unmounts(container, mount_of):
    name = container()
    mount = mount_of(f"docker://{name}:/workspace")
    pid = next(info for info in sandboxfs("list").stdout.splitlines() if mount.path in info).split()[-2]

    file = open(os.path.join(mount.path, "pending"), "wb")
    file.write(b"written before SIGTERM")
    file.flush()
    os.kill(int(pid), signal.SIGTERM)
    try:
        file.close()
    except OSError:
        pass  # the mount may be gone before close reaches it
    deadline = time.monotonic() + 60
    while os.path.ismount(mount.path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.ismount(mount.path)
    assert Sandbox("docker", "/workspace", name).read("/workspace/pending") == b"written before SIGTERM"


def test_stopped_container_gives_enotconn_and_list_shows_broken(container, mount_of):
    name = container()
    Sandbox("docker", "/workspace", name).run("printf data > /workspace/f")
    mount = mount_of(f"docker://{name}:/workspace", "--attr-timeout", "0", "--entry-timeout", "0")
    with open(os.path.join(mount.path, "f")) as file:
        assert file.read() == "data"

    docker("stop", "-t", "0", name)
    started = time.monotonic()
    number = errno_of(os.listdir, mount.path)
    assert number in (errno.EIO, errno.ENOTCONN)
    assert time.monotonic() - started < 30

    line = next(info for info in sandboxfs("list").stdout.splitlines() if mount.path in info)
    assert "broken" in line


def test_old_process_leaves_newer_mount_alone(container, mount_of):
    name = container()
    first = mount_of(f"docker://{name}:/workspace")
    old_pid = int(next(line for line in sandboxfs("list").stdout.splitlines() if first.path in line).split()[-2])
    holder = subprocess.Popen(["sleep", "300"], cwd=first.path)
    try:
        sandboxfs("umount", "--lazy", first.path)
        sandboxfs("mount", f"docker://{name}:/workspace", first.path)
        os.kill(old_pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{old_pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        holder.kill()
        holder.wait()
    assert os.path.ismount(first.path)
    with open(os.path.join(first.path, "after"), "w") as file:
        file.write("new mount")
    assert Sandbox("docker", "/workspace", name).read("/workspace/after") == b"new mount"
    assert first.path in sandboxfs("list").stdout
