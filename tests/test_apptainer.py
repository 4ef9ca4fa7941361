"""What Apptainer makes different: read-only images, bind mounts, ownership,
instances that stop, and the errors of each route.

Each case runs on both SIF images (python: the agent; busybox: the shell
fallback) and through both routes (the local `apptainer` command, and ssh to
the test container).
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
import time

import pytest

from conftest import Mount, apptainer_shim, sandboxfs, start_apptainer_sandbox

KINDS = ["apptainer-python", "apptainer-busybox", "apptainer-ssh-python", "apptainer-ssh-busybox"]


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def instances(trixie_host):
    """Start instances for one test; stop those still running afterwards."""
    started = []

    def start(kind: str, **options):
        sandbox = start_apptainer_sandbox(kind, trixie_host, **options)
        started.append(sandbox.instance)
        return sandbox

    yield start
    for name in started:
        trixie_host.exec(["apptainer", "instance", "stop", name], check=False)


@pytest.fixture
def mount_of():
    mounts = []

    def make(sandbox, root: str | None = None) -> Mount:
        source = sandbox.source if root is None else sandbox.source.replace(":/workspace", f":{root}", 1)
        mount = Mount(source, *sandbox.mount_options)
        mounts.append(mount)
        return mount

    yield make
    for mount in mounts:
        mount.close()


def errno_of(call, *args) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


def test_read_only_image_gives_erofs(kind, instances, mount_of):
    sandbox = instances(kind, writable_tmpfs=False)
    mount = mount_of(sandbox, root="/")

    assert errno_of(open, os.path.join(mount.path, "etc", "new-file"), "w") == errno.EROFS
    assert errno_of(os.mkdir, os.path.join(mount.path, "bin", "new-dir")) == errno.EROFS
    with open(os.path.join(mount.path, "etc", "passwd")) as file:
        assert "root" in file.read()

    # The bind-mounted host directory stays writable.
    with open(os.path.join(mount.path, "workspace", "note"), "w") as file:
        file.write("bound")
    assert sandbox.read("/workspace/note") == b"bound"


def test_writable_tmpfs_accepts_writes_outside_binds(kind, instances, mount_of):
    sandbox = instances(kind, writable_tmpfs=True)
    mount = mount_of(sandbox, root="/")
    with open(os.path.join(mount.path, "etc", "scratch"), "w") as file:
        file.write("in the overlay")
    assert sandbox.read("/etc/scratch") == b"in the overlay"


def test_bind_mount_writes_reach_host_directory(kind, instances, mount_of, trixie_host):
    sandbox = instances(kind)
    mount = mount_of(sandbox)
    with open(os.path.join(mount.path, "result.txt"), "w") as file:
        file.write("from the host")
    on_host = trixie_host.exec(["cat", f"/srv/{sandbox.instance}/result.txt"]).stdout
    assert on_host == b"from the host"


def test_owner_inside_equals_owner_outside(kind, instances, mount_of, trixie_host):
    sandbox = instances(kind)
    mount = mount_of(sandbox)
    with open(os.path.join(mount.path, "owned"), "w") as file:
        file.write("x")
    inside = sandbox.run('stat -c "%u %g" -- "$1"', "/workspace/owned").stdout.split()
    outside = trixie_host.exec(["stat", "-c", "%u %g", f"/srv/{sandbox.instance}/owned"]).stdout.split()
    assert inside == outside
    # The instance runs as root here, and --idmap user shows its files as ours.
    assert os.stat(os.path.join(mount.path, "owned")).st_uid == os.getuid()


def test_stopped_instance_fails_fast_then_recovers_when_started(kind, instances, mount_of, trixie_host):
    sandbox = instances(kind)
    mount = mount_of(sandbox)
    with open(os.path.join(mount.path, "f"), "w") as file:
        file.write("before")

    trixie_host.stop_instance(sandbox.instance)
    started = time.monotonic()
    number = errno_of(os.listdir, mount.path)
    assert number in (errno.EIO, errno.ENOTCONN)
    assert time.monotonic() - started < 30

    line = next(info for info in sandboxfs("list").stdout.splitlines() if mount.path in info)
    assert "broken" in line

    # The same instance started again: the mount comes back without a remount.
    image = kind.rsplit("-", 1)[1]
    trixie_host.start_instance(image, sandbox.instance, binds=[f"/srv/{sandbox.instance}:/workspace"])
    deadline = time.monotonic() + 40
    while True:
        try:
            entries = os.listdir(mount.path)
            break
        except OSError:
            assert time.monotonic() < deadline, "the mount did not recover after the instance started again"
            time.sleep(0.2)
    assert entries == ["f"]
    with open(os.path.join(mount.path, "f")) as file:
        assert file.read() == "before"
    line = next(info for info in sandboxfs("list").stdout.splitlines() if mount.path in info)
    assert line.rstrip().endswith("ok")


def test_missing_instance_is_one_line_error(trixie_host, mountpoint):
    cases = {
        "local": ("apptainer://sbxtest-no-such-instance", "--apptainer", apptainer_shim(trixie_host)),
        "ssh": (
            f"apptainer://sbxtest-no-such-instance?via=ssh://{trixie_host.host_alias}",
            "--ssh-command",
            f"ssh -F {trixie_host.ssh_config}",
        ),
    }
    for route, (source, *options) in cases.items():
        result = sandboxfs("mount", *options, source, mountpoint, check=False)
        assert result.returncode == 1, route
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "sbxtest-no-such-instance" in lines[0]


def test_missing_apptainer_command_is_one_line_error(mountpoint, tmp_path):
    result = sandboxfs("mount", "--apptainer", str(tmp_path / "no-apptainer"), "apptainer://box", mountpoint, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--apptainer" in lines[0]


def test_refused_ssh_is_one_line_error(trixie_host, mountpoint):
    # A port on loopback where nothing listens: the connection is refused.
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as config:
        config.write("Host refused\n    HostName 127.0.0.1\n    Port 1\n    BatchMode yes\n")
        config.flush()
        result = sandboxfs(
            "mount", "--ssh-command", f"ssh -F {config.name}", "apptainer://box?via=ssh://refused", mountpoint, check=False
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "refused" in lines[0]


def test_unknown_host_key_is_refused(trixie_host, mountpoint, tmp_path):
    # The user's ssh config decides: with StrictHostKeyChecking and a
    # known_hosts that lacks the host's key, ssh refuses, and so does the mount.
    empty_known_hosts = tmp_path / "known_hosts"
    empty_known_hosts.write_text("")
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host checked\n"
        "    HostName 127.0.0.1\n"
        f"    Port {trixie_host.ssh_port}\n"
        "    User root\n"
        f"    IdentityFile {trixie_host.key}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {empty_known_hosts}\n"
        "    StrictHostKeyChecking yes\n"
        "    BatchMode yes\n"
    )
    log = tmp_path / "mount.log"

    result = sandboxfs(
        "mount", "--debug", "--log-file", str(log), "--ssh-command", f"ssh -F {config}",
        "apptainer://box?via=ssh://checked", mountpoint, check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "Host key verification failed" in lines[0]
    assert not os.path.ismount(mountpoint)

    # The private key's content never reaches the log, even with --debug.
    with open(trixie_host.key, encoding="utf-8") as key:
        secret_lines = [line for line in key.read().splitlines() if line and not line.startswith("-----")]
    logged = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    assert not any(line in logged for line in secret_lines)


def test_large_file_streams_with_bounded_memory(instances, mount_of, tmp_path):
    sandbox = instances("apptainer-python")
    mount = mount_of(sandbox)
    size = 512 << 20
    source = tmp_path / "big"
    with open(source, "wb") as file:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            file.write(block)

    subprocess.run(["cp", str(source), os.path.join(mount.path, "big")], check=True)
    assert sandbox.run("wc -c < /workspace/big").stdout.strip() == str(size).encode()
    subprocess.run(["cmp", str(source), os.path.join(mount.path, "big")], check=True)

    pid = next(info for info in sandboxfs("list").stdout.splitlines() if mount.path in info).split()[-2]
    with open(f"/proc/{pid}/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    # The file is 512 MiB; the server's peak resident memory stays far below.
    assert peak_kib < 200 * 1024
