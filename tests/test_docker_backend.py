"""The Docker backend against real containers: the shell fallback and the helper.

The shell fallback (`ShellBackend`) runs on the busybox image (busybox ash and
applets) and, forced, on the Debian image (dash and GNU coreutils), so each
script is checked with both tool sets. Images come from
SANDBOXFS_TEST_BUSYBOX_IMAGE and SANDBOXFS_TEST_DEBIAN_IMAGE (built by
`scripts/testbed images`).
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
import uuid

import pytest
import trio

from sandboxfs.backend import BackendError, ConnectError
from sandboxfs.backends.docker import DockerExecRunner, _open_client, connect_docker
from sandboxfs.backends.shell import ShellBackend

pytestmark = pytest.mark.docker

BUSYBOX_IMAGE = os.environ.get("SANDBOXFS_TEST_BUSYBOX_IMAGE", "sandboxfs-test/busybox:latest")
DEBIAN_IMAGE = os.environ.get("SANDBOXFS_TEST_DEBIAN_IMAGE", "sandboxfs-test/debian:latest")

HOSTILE_NAMES = [
    "with space",
    "quote'double\"",
    "new\nline",
    "trailing newline\n",
    "$(touch pwned)",
    "`touch pwned2`",
    "-leading-dash",
    "--",
    "back\\slash \\0101",
    "*",
    "semi;colon&amp|pipe",
    "percent %s %b",
    "x",
    "e",
    "unicode \u00e9\u4e2d",
    os.fsdecode(b"latin1 \xe9 \xff\xfe"),
]


def docker_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, check=check)


def start_container(image: str, *options: str) -> str:
    name = f"sbxtest-{uuid.uuid4().hex[:10]}"
    result = docker_cli("run", "-d", "--name", name, *options, image, "sleep", "infinity", check=False)
    if result.returncode != 0:
        pytest.fail(f"cannot start {image}: {result.stderr.decode().strip()} (run scripts/testbed images)")
    return name


@pytest.fixture(scope="module")
def busybox():
    name = start_container(BUSYBOX_IMAGE)
    yield name
    docker_cli("rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def debian():
    name = start_container(DEBIAN_IMAGE)
    yield name
    docker_cli("rm", "-f", name, check=False)


@pytest.fixture(params=["busybox", "debian-gnu"])
def shell_sandbox(request, busybox, debian):
    """(container, force shell): busybox tools, or GNU coreutils and dash."""
    if request.param == "busybox":
        return busybox, False
    return debian, True


def run_shell(sandbox, test, user: str | None = None):
    """Run `await test(backend, workdir)` with a ShellBackend and a fresh directory."""
    container, force_shell = sandbox

    async def main():
        async with trio.open_nursery() as nursery:
            if force_shell:
                client = await _open_client()
                backend = ShellBackend(DockerExecRunner(client, container, user), "/")
                await backend.start()
            else:
                backend = await connect_docker(nursery, container, "/", user=user)
            assert isinstance(backend, ShellBackend)
            workdir = f"/tmp/t-{uuid.uuid4().hex[:8]}"
            await backend.mkdir(workdir, 0o777)
            try:
                return await test(backend, workdir)
            finally:
                await backend.aclose()

    return trio.run(main)


def in_container(container: str, script: str, *args: str) -> subprocess.CompletedProcess:
    return docker_cli("exec", container, "sh", "-c", script, "sh", *args, check=False)


async def expect_error(code: str, call) -> BackendError:
    with pytest.raises(BackendError) as info:
        await call
    assert info.value.code == code, info.value
    return info.value


# Connecting.


def test_connect_busybox_uses_shell(busybox):
    async def main():
        async with trio.open_nursery() as nursery:
            backend = await connect_docker(nursery, busybox, "/workspace")
            alice = await connect_docker(nursery, busybox, "/", user="alice")
        assert isinstance(backend, ShellBackend)
        assert backend.root == "/workspace"
        assert (backend.identity.uid, backend.identity.gid) == (0, 0)
        assert (alice.identity.uid, alice.identity.gid) == (1000, 1000)

    trio.run(main)


def connect_error(container: str, root: str = "/", user: str | None = None) -> str:
    async def main():
        async with trio.open_nursery() as nursery:
            with pytest.raises(ConnectError) as info:
                await connect_docker(nursery, container, root, user=user)
        return str(info.value)

    message = trio.run(main)
    assert "\n" not in message
    return message


def test_connect_missing_container():
    name = f"sbxtest-missing-{uuid.uuid4().hex[:6]}"
    message = connect_error(name)
    assert f"container {name!r} not found" in message
    assert "docker ps" in message


def test_connect_stopped_container():
    name = f"sbxtest-{uuid.uuid4().hex[:10]}"
    docker_cli("create", "--name", name, BUSYBOX_IMAGE, "sleep", "infinity")
    try:
        message = connect_error(name)
    finally:
        docker_cli("rm", "-f", name, check=False)
    assert f"container {name!r} is not running (status created)" in message
    assert f"docker start {name}" in message


@pytest.mark.parametrize("image", ["busybox", "debian"])
def test_connect_missing_root(image, busybox, debian):
    container = busybox if image == "busybox" else debian
    message = connect_error(container, "/no/such/dir")
    assert "'/no/such/dir'" in message
    assert "not found" in message or "does not exist" in message


@pytest.mark.parametrize("image", ["busybox", "debian"])
def test_connect_root_is_file(image, busybox, debian):
    container = busybox if image == "busybox" else debian
    message = connect_error(container, "/etc/passwd")
    assert "'/etc/passwd' is not a directory" in message


@pytest.mark.parametrize("image", ["busybox", "debian"])
def test_connect_unknown_user(image, busybox, debian):
    container = busybox if image == "busybox" else debian
    message = connect_error(container, "/", user="nosuchuser")
    assert "user 'nosuchuser' not found" in message


def test_connect_unreachable_daemon(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    message = connect_error("sbxtest-any")
    assert "cannot reach the Docker daemon at unix:///nonexistent/docker.sock" in message


# The shell fallback: metadata.


def test_shell_stat_kinds(shell_sandbox):
    async def test(backend, d):
        before = time.time_ns() - 5 * 10**9
        await backend.write_file(f"{d}/f", b"hello")
        await backend.mkdir(f"{d}/sub", 0o755)
        await backend.symlink("sub", f"{d}/link")
        await backend.symlink("nowhere", f"{d}/dangling")

        st = await backend.stat(f"{d}/f")
        assert stat.S_ISREG(st.mode)
        assert st.size == 5
        assert st.uid == 0
        assert st.nlink == 1
        assert st.ino > 0
        assert st.mtime_ns >= before
        assert (await backend.stat(f"{d}/sub")).is_dir
        assert (await backend.stat(f"{d}/link")).is_symlink
        assert (await backend.stat(f"{d}/link", follow=True)).is_dir
        await expect_error("file_not_found", backend.stat(f"{d}/dangling", follow=True))
        await expect_error("file_not_found", backend.stat(f"{d}/missing"))
        await expect_error("not_a_directory", backend.stat(f"{d}/f/x"))

        null = await backend.stat("/dev/null")
        assert stat.S_ISCHR(null.mode)
        assert null.rdev == os.makedev(1, 3)

    run_shell(shell_sandbox, test)


def test_shell_list_dir(shell_sandbox):
    async def test(backend, d):
        assert await backend.list_dir(d) == []
        await backend.write_file(f"{d}/a", b"1")
        await backend.write_file(f"{d}/.hidden", b"22")
        await backend.mkdir(f"{d}/..dots", 0o700)
        await backend.symlink("nowhere", f"{d}/dangling")

        entries = dict(await backend.list_dir(d))
        assert sorted(entries) == ["..dots", ".hidden", "a", "dangling"]
        assert entries[".hidden"].size == 2
        assert entries["..dots"].is_dir
        assert entries["dangling"].is_symlink

        await expect_error("file_not_found", backend.list_dir(f"{d}/missing"))
        await expect_error("not_a_directory", backend.list_dir(f"{d}/a"))

    run_shell(shell_sandbox, test)


def test_shell_list_dir_many_entries(shell_sandbox):
    async def test(backend, d):
        container = shell_sandbox[0]
        in_container(container, 'cd "$1" && i=0; while [ $i -lt 500 ]; do : > "f$i"; i=$((i+1)); done', d)
        entries = await backend.list_dir(d)
        assert len(entries) == 500
        assert {name for name, _ in entries} == {f"f{i}" for i in range(500)}

    run_shell(shell_sandbox, test)


def test_shell_statfs_and_fsync(shell_sandbox):
    async def test(backend, d):
        fs = await backend.statfs(d)
        assert fs.blocks > 0
        assert fs.bsize > 0
        assert fs.namemax == 255
        await backend.write_file(f"{d}/f", b"x")
        await backend.fsync(f"{d}/f")
        await expect_error("file_not_found", backend.statfs(f"{d}/missing"))

    run_shell(shell_sandbox, test)


def test_shell_identity_as_alice(shell_sandbox):
    async def test(backend, d):
        assert (backend.identity.uid, backend.identity.gid) == (1000, 1000)
        await expect_error("permission_denied", backend.mkdir("/forbidden", 0o755))
        await expect_error("permission_denied", backend.create("/etc/forbidden", 0o644))
        await expect_error("permission_denied", backend.list_dir("/root"))
        await expect_error("permission_denied", backend.stat("/root/anything"))
        await expect_error("not_permitted", backend.chown(d, 0, 0))

    run_shell(shell_sandbox, test, user="alice")


# The shell fallback: data.


def test_shell_read_write_offsets(shell_sandbox):
    async def test(backend, d):
        path = f"{d}/f"
        await backend.create(path, 0o644)
        await backend.write(path, 0, b"hello world")
        await backend.write(path, 6, b"WORLD")
        assert await backend.read(path, 0, 100) == b"hello WORLD"
        assert await backend.read(path, 6, 3) == b"WOR"
        assert await backend.read(path, 11, 10) == b""
        assert await backend.read(path, 50, 10) == b""

        await backend.write(path, 20, b"!")
        assert await backend.read(path, 0, 100) == b"hello WORLD" + b"\0" * 9 + b"!"

        await backend.truncate(path, 5)
        assert await backend.read(path, 0, 100) == b"hello"
        await backend.truncate(path, 8)
        assert await backend.read(path, 0, 100) == b"hello\0\0\0"

    run_shell(shell_sandbox, test)


def test_shell_data_errors(shell_sandbox):
    async def test(backend, d):
        await backend.mkdir(f"{d}/dir", 0o755)
        await expect_error("file_not_found", backend.write(f"{d}/missing", 0, b"x"))
        await expect_error("file_not_found", backend.truncate(f"{d}/missing", 0))
        await expect_error("file_not_found", backend.read(f"{d}/missing", 0, 10))
        await expect_error("is_directory", backend.read(f"{d}/dir", 0, 10))
        await expect_error("is_directory", backend.write(f"{d}/dir", 0, b"x"))
        await expect_error("is_directory", backend.truncate(f"{d}/dir", 0))
        names = [name for name, _ in await backend.list_dir(d)]
        assert names == ["dir"]

    run_shell(shell_sandbox, test)


def test_shell_large_file_round_trip(shell_sandbox):
    async def test(backend, d):
        data = os.urandom(5 << 20)
        path = f"{d}/big"
        await backend.create(path, 0o644)
        chunk = 1 << 20
        for offset in range(0, len(data), chunk):
            await backend.write(path, offset, data[offset : offset + chunk])
        assert (await backend.stat(path)).size == len(data)
        assert await backend.read_file(path) == data
        assert await backend.read(path, 3 << 20, 1000) == data[3 << 20 : (3 << 20) + 1000]

    run_shell(shell_sandbox, test)


def test_shell_write_through_symlink(shell_sandbox):
    async def test(backend, d):
        await backend.write_file(f"{d}/target", b"abc")
        await backend.symlink("target", f"{d}/link")
        await backend.write(f"{d}/link", 3, b"def")
        assert await backend.read(f"{d}/target", 0, 10) == b"abcdef"
        assert await backend.read(f"{d}/link", 0, 10) == b"abcdef"

    run_shell(shell_sandbox, test)


# The shell fallback: namespace.


def test_shell_create(shell_sandbox):
    async def test(backend, d):
        st = await backend.create(f"{d}/f", 0o640)
        assert stat.S_IMODE(st.mode) == 0o640
        assert st.is_regular
        await expect_error("already_exists", backend.create(f"{d}/f", 0o644))
        again = await backend.create(f"{d}/f", 0o600, exclusive=False)
        assert stat.S_IMODE(again.mode) == 0o640

        await backend.symlink("nowhere", f"{d}/dangling")
        await expect_error("already_exists", backend.create(f"{d}/dangling", 0o644))
        await backend.mkdir(f"{d}/dir", 0o755)
        await expect_error("is_directory", backend.create(f"{d}/dir", 0o644, exclusive=False))
        await expect_error("file_not_found", backend.create(f"{d}/missing/f", 0o644))
        await expect_error("not_a_directory", backend.create(f"{d}/f/g", 0o644))

    run_shell(shell_sandbox, test)


def test_shell_mkdir_and_rmdir(shell_sandbox):
    async def test(backend, d):
        st = await backend.mkdir(f"{d}/sub", 0o2750)
        assert st.is_dir
        assert stat.S_IMODE(st.mode) == 0o2750
        await expect_error("already_exists", backend.mkdir(f"{d}/sub", 0o755))
        await expect_error("file_not_found", backend.mkdir(f"{d}/missing/sub", 0o755))

        await backend.write_file(f"{d}/sub/f", b"")
        await expect_error("not_empty", backend.rmdir(f"{d}/sub"))
        await expect_error("not_a_directory", backend.rmdir(f"{d}/sub/f"))
        await expect_error("file_not_found", backend.rmdir(f"{d}/missing"))
        await backend.unlink(f"{d}/sub/f")
        await backend.rmdir(f"{d}/sub")
        await expect_error("file_not_found", backend.stat(f"{d}/sub"))

    run_shell(shell_sandbox, test)


def test_shell_mknod(shell_sandbox):
    async def test(backend, d):
        fifo = await backend.mknod(f"{d}/fifo", stat.S_IFIFO | 0o600, 0)
        assert stat.S_ISFIFO(fifo.mode)
        assert stat.S_IMODE(fifo.mode) == 0o600
        device = await backend.mknod(f"{d}/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        assert stat.S_ISCHR(device.mode)
        assert device.rdev == os.makedev(1, 3)
        regular = await backend.mknod(f"{d}/reg", stat.S_IFREG | 0o644, 0)
        assert regular.is_regular
        await expect_error("already_exists", backend.mknod(f"{d}/fifo", stat.S_IFIFO | 0o600, 0))
        await expect_error("not_supported", backend.mknod(f"{d}/sock", stat.S_IFSOCK | 0o600, 0))

    run_shell(shell_sandbox, test)


def test_shell_unlink(shell_sandbox):
    async def test(backend, d):
        await backend.write_file(f"{d}/f", b"x")
        await backend.mkdir(f"{d}/dir", 0o755)
        await backend.symlink("dir", f"{d}/link")
        await backend.unlink(f"{d}/f")
        await expect_error("file_not_found", backend.unlink(f"{d}/f"))
        await expect_error("is_directory", backend.unlink(f"{d}/dir"))
        await backend.unlink(f"{d}/link")
        assert [name for name, _ in await backend.list_dir(d)] == ["dir"]

    run_shell(shell_sandbox, test)


def test_shell_rename(shell_sandbox):
    async def test(backend, d):
        await backend.write_file(f"{d}/a", b"A")
        await backend.write_file(f"{d}/b", b"B")
        await backend.rename(f"{d}/a", f"{d}/b")
        assert await backend.read_file(f"{d}/b") == b"A"
        await expect_error("file_not_found", backend.stat(f"{d}/a"))

        await backend.write_file(f"{d}/c", b"C")
        await expect_error("already_exists", backend.rename(f"{d}/c", f"{d}/b", noreplace=True))
        await backend.rename(f"{d}/c", f"{d}/new", noreplace=True)
        await expect_error("file_not_found", backend.rename(f"{d}/c", f"{d}/x"))
        await backend.rename(f"{d}/new", f"{d}/new")

        await backend.mkdir(f"{d}/d1", 0o755)
        await backend.write_file(f"{d}/d1/inside", b"1")
        await backend.mkdir(f"{d}/empty", 0o755)
        await backend.rename(f"{d}/d1", f"{d}/empty")
        assert await backend.read_file(f"{d}/empty/inside") == b"1"
        await expect_error("file_not_found", backend.stat(f"{d}/d1"))

        await backend.mkdir(f"{d}/d2", 0o755)
        await expect_error("not_empty", backend.rename(f"{d}/d2", f"{d}/empty"))
        await expect_error("is_directory", backend.rename(f"{d}/b", f"{d}/d2"))
        await expect_error("not_a_directory", backend.rename(f"{d}/d2", f"{d}/b"))
        await expect_error("invalid_argument", backend.rename(f"{d}/d2", f"{d}/d2/sub"))

        # A file renamed over a symlink to a directory replaces the symlink.
        await backend.symlink("d2", f"{d}/link")
        await backend.rename(f"{d}/b", f"{d}/link")
        assert (await backend.stat(f"{d}/link")).is_regular
        assert await backend.list_dir(f"{d}/d2") == []

    run_shell(shell_sandbox, test)


def test_shell_symlink_and_readlink(shell_sandbox):
    async def test(backend, d):
        targets = ["plain", "/abs/path", "-dash", "with\nnewline\n\n", "../up", " spaces "]
        for index, target in enumerate(targets):
            st = await backend.symlink(target, f"{d}/l{index}")
            assert st.is_symlink
            assert await backend.readlink(f"{d}/l{index}") == target

        await backend.write_file(f"{d}/f", b"")
        await backend.mkdir(f"{d}/dir", 0o755)
        await expect_error("invalid_argument", backend.readlink(f"{d}/f"))
        await expect_error("file_not_found", backend.readlink(f"{d}/missing"))
        await expect_error("already_exists", backend.symlink("x", f"{d}/f"))
        await expect_error("already_exists", backend.symlink("x", f"{d}/dir"))
        assert await backend.list_dir(f"{d}/dir") == []

    run_shell(shell_sandbox, test)


def test_shell_link(shell_sandbox):
    async def test(backend, d):
        await backend.write_file(f"{d}/f", b"data")
        st = await backend.link(f"{d}/f", f"{d}/g")
        assert st.nlink == 2
        assert st.ino == (await backend.stat(f"{d}/f")).ino
        await backend.mkdir(f"{d}/dir", 0o755)
        await expect_error("not_permitted", backend.link(f"{d}/dir", f"{d}/dir2"))
        await expect_error("already_exists", backend.link(f"{d}/f", f"{d}/g"))
        await expect_error("already_exists", backend.link(f"{d}/f", f"{d}/dir"))
        await expect_error("file_not_found", backend.link(f"{d}/missing", f"{d}/h"))

        await backend.symlink("nowhere", f"{d}/dangling")
        linked = await backend.link(f"{d}/dangling", f"{d}/dangling2")
        assert linked.is_symlink

    run_shell(shell_sandbox, test)


# The shell fallback: attributes.


def test_shell_chmod(shell_sandbox):
    async def test(backend, d):
        await backend.write_file(f"{d}/f", b"")
        await backend.chmod(f"{d}/f", 0o4751)
        assert stat.S_IMODE((await backend.stat(f"{d}/f")).mode) == 0o4751

        await backend.mkdir(f"{d}/dir", 0o2755)
        await backend.chmod(f"{d}/dir", 0o755)
        assert stat.S_IMODE((await backend.stat(f"{d}/dir")).mode) == 0o755

        await backend.symlink("f", f"{d}/link")
        await backend.chmod(f"{d}/link", 0o600)
        assert stat.S_IMODE((await backend.stat(f"{d}/f")).mode) == 0o600
        await expect_error("file_not_found", backend.chmod(f"{d}/missing", 0o600))

    run_shell(shell_sandbox, test)


def test_shell_chown(shell_sandbox):
    async def test(backend, d):
        await backend.write_file(f"{d}/f", b"")
        await backend.symlink("f", f"{d}/link")
        await backend.chown(f"{d}/f", 1000, 1000)
        st = await backend.stat(f"{d}/f")
        assert (st.uid, st.gid) == (1000, 1000)

        await backend.chown(f"{d}/f", None, 4242)
        st = await backend.stat(f"{d}/f")
        assert (st.uid, st.gid) == (1000, 4242)
        await backend.chown(f"{d}/f", 4343, None)
        st = await backend.stat(f"{d}/f")
        assert (st.uid, st.gid) == (4343, 4242)

        await backend.chown(f"{d}/link", 77, 88)
        link = await backend.stat(f"{d}/link")
        assert (link.uid, link.gid) == (77, 88)
        st = await backend.stat(f"{d}/f")
        assert (st.uid, st.gid) == (4343, 4242)
        await expect_error("file_not_found", backend.chown(f"{d}/missing", 1, 1))
        await expect_error("file_not_found", backend.chown(f"{d}/missing", None, None))

    run_shell(shell_sandbox, test)


def test_shell_utimens(shell_sandbox):
    async def test(backend, d):
        await backend.write_file(f"{d}/f", b"")
        await backend.utimens(f"{d}/f", 1_000_000_000 * 10**9, 1_200_000_000 * 10**9 + 5)
        st = await backend.stat(f"{d}/f")
        assert st.atime_ns == 1_000_000_000 * 10**9
        # Nanoseconds are lost: stat -c prints whole seconds.
        assert st.mtime_ns == 1_200_000_000 * 10**9

        await backend.utimens(f"{d}/f", None, 1_300_000_000 * 10**9)
        st = await backend.stat(f"{d}/f")
        assert st.atime_ns == 1_000_000_000 * 10**9
        assert st.mtime_ns == 1_300_000_000 * 10**9

        await backend.symlink("f", f"{d}/link")
        await backend.utimens(f"{d}/link", 5 * 10**9, 6 * 10**9)
        link = await backend.stat(f"{d}/link")
        assert link.mtime_ns == 6 * 10**9
        assert (await backend.stat(f"{d}/f")).mtime_ns == 1_300_000_000 * 10**9
        await expect_error("file_not_found", backend.utimens(f"{d}/missing", 0, 0))

    run_shell(shell_sandbox, test)


def test_shell_read_only_container():
    name = start_container(BUSYBOX_IMAGE, "--read-only")

    async def main():
        async with trio.open_nursery() as nursery:
            backend = await connect_docker(nursery, name, "/", read_only=True)
            assert (await backend.stat("/etc/passwd")).is_regular
            await expect_error("read_only", backend.create("/tmp/new", 0o644))
            await expect_error("read_only", backend.mkdir("/tmp/newdir", 0o755))
            await expect_error("read_only", backend.write("/etc/passwd", 0, b"x"))
            await expect_error("read_only", backend.unlink("/etc/passwd"))

    try:
        trio.run(main)
    finally:
        docker_cli("rm", "-f", name, check=False)


# Hostile names.


def test_shell_hostile_names(shell_sandbox):
    container = shell_sandbox[0]
    in_container(container, "rm -f /pwned /pwned2")

    async def test(backend, d):
        for index, name in enumerate(HOSTILE_NAMES):
            path = f"{d}/{name}"
            content = f"content {index}".encode()
            await backend.create(path, 0o644)
            await backend.write(path, 0, content)
            assert await backend.read(path, 0, 100) == content, name
            assert (await backend.stat(path)).size == len(content), name

        names = sorted(name for name, _ in await backend.list_dir(d))
        assert names == sorted(HOSTILE_NAMES)

        for name in HOSTILE_NAMES:
            await backend.rename(f"{d}/{name}", f"{d}/{name}.renamed")
            await backend.symlink(name, f"{d}/{name}.link")
            assert await backend.readlink(f"{d}/{name}.link") == name
            await backend.unlink(f"{d}/{name}.renamed")
            await backend.unlink(f"{d}/{name}.link")
        assert await backend.list_dir(d) == []

        await backend.mkdir(f"{d}/-dir", 0o755)
        await backend.write_file(f"{d}/-dir/-f", b"x")
        assert [name for name, _ in await backend.list_dir(f"{d}/-dir")] == ["-f"]

    run_shell(shell_sandbox, test)
    # Commands in a container start in its working directory, "/" in these images.
    assert in_container(container, "ls /pwned").returncode != 0
    assert in_container(container, "ls /pwned2").returncode != 0


def test_shell_non_utf8_name_is_real_bytes(shell_sandbox):
    container = shell_sandbox[0]
    raw = b"\xff\xfe name"

    async def test(backend, d):
        await backend.write_file(f"{d}/{os.fsdecode(raw)}", b"x")
        return d

    workdir = run_shell(shell_sandbox, test)
    listing = in_container(container, 'cd "$1" && for f in *; do printf "%s" "$f"; done', workdir)
    assert listing.stdout == raw


# The helper over one exec stream.


def test_agent_on_debian(debian):
    async def main():
        async with trio.open_nursery() as nursery:
            backend = await connect_docker(nursery, debian, "/tmp")
            assert not isinstance(backend, ShellBackend)
            assert backend.root == "/tmp"
            assert (await backend.stat("/etc/passwd")).is_regular
            names = [name for name, _ in await backend.list_dir("/etc")]
            assert "passwd" in names

            data = os.urandom(20 << 20)
            path = f"/tmp/agent-{uuid.uuid4().hex[:8]}"
            await backend.write_file(path, data)
            assert (await backend.stat(path)).size == len(data)
            assert await backend.read_file(path) == data
            await backend.unlink(path)
            assert "python3 -I -c" in await trio.to_thread.run_sync(command_lines, debian)
            await backend.aclose()

    trio.run(main)
    assert "python3 -I -c" not in command_lines(debian)


def command_lines(container: str) -> str:
    """Return the command lines of the processes in a container, one a line."""
    script = 'for f in /proc/[0-9]*/cmdline; do tr "\\0" " " < "$f"; echo; done'
    return in_container(container, script).stdout.decode()


def test_agent_user_and_errors(debian):
    async def main():
        async with trio.open_nursery() as nursery:
            backend = await connect_docker(nursery, debian, "/", user="alice")
            assert (backend.identity.uid, backend.identity.gid) == (1000, 1000)
            await expect_error("permission_denied", backend.mkdir("/forbidden", 0o755))
            await expect_error("file_not_found", backend.stat("/no/such/file"))
            await backend.aclose()

    trio.run(main)
