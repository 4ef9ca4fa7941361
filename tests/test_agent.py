"""Tests of the agent, its wire protocol and the local backend.

Each test starts a real agent process on a temporary directory. Tests run
async code with trio.run and synchronise on process states and
`trio.testing.wait_all_tasks_blocked`, never on sleeps.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import shutil

import pytest
import trio
import trio.testing

from sandboxfs.backend import BackendError, ConnectError, Stat
from sandboxfs.backends.local import connect_local
from sandboxfs.remote import BOOTSTRAP, agent_command, agent_source, connect
from sandboxfs.remote.agent import (
    LIST_DIR_BATCH,
    MAX_MESSAGE,
    PREFIX,
    STAT_FIELDS,
)
from sandboxfs.remote.channel import Channel

MiB = 1 << 20


def run_local(root, test, **options):
    """Run `await test(backend, root)` against a local agent serving `root`."""

    async def main():
        async with trio.open_nursery() as nursery:
            backend = await connect_local(nursery, str(root), **options)
            try:
                with trio.fail_after(60):
                    await test(backend, str(root))
            finally:
                await backend.aclose()

    trio.run(main)


async def expect_error(code, function, *args):
    with pytest.raises(BackendError) as info:
        await function(*args)
    assert info.value.code == code, info.value
    return info.value


# The bootstrap and the shared constants.


def test_bootstrap_fits_one_shell_argument():
    assert "\n" not in BOOTSTRAP
    assert "'" not in BOOTSTRAP
    assert "$" not in BOOTSTRAP


def test_stat_fields_match_stat_dataclass():
    assert STAT_FIELDS == tuple(field.name for field in dataclasses.fields(Stat))


def test_agent_source_is_agent_module():
    source = agent_source()
    assert b"def serve(in_fd, out_fd)" in source
    assert b"from sandboxfs" not in source
    assert b"import sandboxfs" not in source


def test_hello_sets_identity(tmp_path):
    async def check(backend, root):
        assert backend.identity.uid == os.geteuid()
        assert backend.identity.gid == os.getegid()
        assert backend.hello_info["pid"] > 0
        assert backend.root == root

    run_local(tmp_path, check)


# Metadata.


def test_stat_file_and_symlink(tmp_path):
    (tmp_path / "file").write_bytes(b"12345")
    os.symlink("file", tmp_path / "link")

    async def check(backend, root):
        st = await backend.stat(f"{root}/file")
        assert st.is_regular
        assert st.size == 5
        assert st.ino == os.lstat(tmp_path / "file").st_ino
        assert st.mtime_ns == os.lstat(tmp_path / "file").st_mtime_ns

        link = await backend.stat(f"{root}/link")
        assert link.is_symlink
        followed = await backend.stat(f"{root}/link", follow=True)
        assert followed.is_regular
        assert followed.ino == st.ino

    run_local(tmp_path, check)


def test_stat_errors(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    os.symlink("missing", tmp_path / "dangling")

    async def check(backend, root):
        await expect_error("file_not_found", backend.stat, f"{root}/missing")
        await expect_error("not_a_directory", backend.stat, f"{root}/file/x")
        await expect_error("file_not_found", backend.stat, f"{root}/dangling", True)
        assert (await backend.stat(f"{root}/dangling")).is_symlink

    run_local(tmp_path, check)


def test_list_dir_returns_lstat_of_each_entry(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"aaa")
    (tmp_path / "d" / "sub").mkdir()
    os.symlink("/nowhere", tmp_path / "d" / "link")

    async def check(backend, root):
        entries = dict(await backend.list_dir(f"{root}/d"))
        assert sorted(entries) == ["a", "link", "sub"]
        assert entries["a"].size == 3
        assert entries["a"].is_regular
        assert entries["sub"].is_dir
        assert entries["link"].is_symlink
        assert entries["a"].ino == os.lstat(tmp_path / "d" / "a").st_ino

    run_local(tmp_path, check)


def test_list_dir_larger_than_one_reply_part(tmp_path):
    count = LIST_DIR_BATCH * 2 + 7
    for index in range(count):
        (tmp_path / f"f{index}").write_bytes(b"x" * (index % 50))

    async def check(backend, root):
        entries = await backend.list_dir(root)
        assert len(entries) == count
        sizes = {name: st.size for name, st in entries}
        assert all(sizes[f"f{index}"] == index % 50 for index in range(count))

    run_local(tmp_path, check)


def test_list_dir_errors(tmp_path):
    (tmp_path / "file").write_bytes(b"")

    async def check(backend, root):
        await expect_error("file_not_found", backend.list_dir, f"{root}/missing")
        await expect_error("not_a_directory", backend.list_dir, f"{root}/file")

    run_local(tmp_path, check)


def test_statfs(tmp_path):
    async def check(backend, root):
        result = await backend.statfs(root)
        expected = os.statvfs(tmp_path)
        assert result.namemax == expected.f_namemax
        assert result.blocks == expected.f_blocks
        assert result.bsize == expected.f_bsize
        await expect_error("file_not_found", backend.statfs, f"{root}/missing")

    run_local(tmp_path, check)


def test_readlink_returns_target_unchanged(tmp_path):
    os.symlink("../a/./b//c", tmp_path / "link")
    (tmp_path / "file").write_bytes(b"")

    async def check(backend, root):
        assert await backend.readlink(f"{root}/link") == "../a/./b//c"
        error = await expect_error("invalid_path", backend.readlink, f"{root}/file")
        assert error.errno == errno.EINVAL
        await expect_error("file_not_found", backend.readlink, f"{root}/missing")

    run_local(tmp_path, check)


# Data.


def test_read_ranges_and_end_of_file(tmp_path):
    (tmp_path / "file").write_bytes(b"0123456789")

    async def check(backend, root):
        path = f"{root}/file"
        assert await backend.read(path, 0, 4) == b"0123"
        assert await backend.read(path, 6, 100) == b"6789"
        assert await backend.read(path, 10, 5) == b""
        assert await backend.read(path, 50, 5) == b""
        assert await backend.read(path, 3, 0) == b""

    run_local(tmp_path, check)


def test_read_and_write_errors(tmp_path):
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")

    async def check(backend, root):
        await expect_error("file_not_found", backend.read, f"{root}/missing", 0, 1)
        await expect_error("is_directory", backend.read, f"{root}/dir", 0, 1)
        await expect_error("file_not_found", backend.write, f"{root}/missing", 0, b"x")
        await expect_error("is_directory", backend.write, f"{root}/dir", 0, b"x")
        # A FIFO without a reader must not block the agent.
        error = await expect_error("invalid_path", backend.read, f"{root}/fifo", 0, 1)
        assert error.errno == errno.EINVAL
        await expect_error("is_directory", backend.read_file, f"{root}/dir")
        await expect_error("file_not_found", backend.read_file, f"{root}/missing")

    run_local(tmp_path, check)


def test_write_keeps_other_bytes(tmp_path):
    (tmp_path / "file").write_bytes(b"abcdefgh")

    async def check(backend, root):
        await backend.write(f"{root}/file", 2, b"XY")
        await backend.write(f"{root}/file", 10, b"Z")
        await backend.write(f"{root}/file", 0, b"")

    run_local(tmp_path, check)
    assert (tmp_path / "file").read_bytes() == b"abXYefgh\0\0Z"


def test_truncate_and_fsync(tmp_path):
    (tmp_path / "file").write_bytes(b"abcdefgh")

    async def check(backend, root):
        await backend.truncate(f"{root}/file", 3)
        await backend.fsync(f"{root}/file")
        await backend.fsync(root)
        await expect_error("file_not_found", backend.truncate, f"{root}/missing", 0)
        await expect_error("is_directory", backend.truncate, root, 0)
        await expect_error("file_not_found", backend.fsync, f"{root}/missing")

    run_local(tmp_path, check)
    assert (tmp_path / "file").read_bytes() == b"abc"


def test_large_file_across_chunks(tmp_path):
    content = os.urandom(20 * MiB + 12345)

    async def check(backend, root):
        path = f"{root}/big"
        await backend.write_file(path, content)
        assert (tmp_path / "big").read_bytes() == content
        assert await backend.read_file(path) == content
        assert await backend.read(path, 0, len(content) + MiB) == content
        assert await backend.read(path, 5 * MiB + 3, 3 * MiB) == content[5 * MiB + 3 : 8 * MiB + 3]

        reversed_content = content[::-1]
        await backend.write(path, 0, reversed_content)
        assert (tmp_path / "big").read_bytes() == reversed_content

        await backend.write_file(path, b"short")
        assert await backend.read_file(path) == b"short"

    run_local(tmp_path, check)


def test_write_file_and_downloads(tmp_path):
    async def check(backend, root):
        await backend.write_file(f"{root}/new", b"one", mode=0o600)
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o600
        responses = await backend.aupload_files([(f"{root}/up", b"x"), ("rel", b"y")])
        assert [response.error for response in responses] == [None, "invalid_path"]
        downloads = await backend.adownload_files([f"{root}/new", f"{root}/missing"])
        assert downloads[0].content == b"one"
        assert downloads[1].error == "file_not_found"

    run_local(tmp_path, check)


# Namespace.


def test_create_exclusive_and_mode(tmp_path):
    async def check(backend, root):
        st = await backend.create(f"{root}/file", 0o640)
        assert st.is_regular
        assert stat.S_IMODE(st.mode) == 0o640  # the agent's umask is 0
        await expect_error("already_exists", backend.create, f"{root}/file", 0o644)
        again = await backend.create(f"{root}/file", 0o600, exclusive=False)
        assert stat.S_IMODE(again.mode) == 0o640
        await expect_error("file_not_found", backend.create, f"{root}/no/file", 0o644)

    run_local(tmp_path, check)


def test_mkdir_and_mknod(tmp_path):
    async def check(backend, root):
        st = await backend.mkdir(f"{root}/dir", 0o751)
        assert st.is_dir
        assert stat.S_IMODE(st.mode) == 0o751
        await expect_error("already_exists", backend.mkdir, f"{root}/dir", 0o755)
        fifo = await backend.mknod(f"{root}/fifo", stat.S_IFIFO | 0o600, 0)
        assert stat.S_ISFIFO(fifo.mode)
        await expect_error("already_exists", backend.mknod, f"{root}/fifo", stat.S_IFIFO | 0o600, 0)

    run_local(tmp_path, check)


def test_unlink_and_rmdir_errors(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_bytes(b"")

    async def check(backend, root):
        await expect_error("not_empty", backend.rmdir, f"{root}/full")
        await expect_error("not_a_directory", backend.rmdir, f"{root}/file")
        await expect_error("is_directory", backend.unlink, f"{root}/empty")
        await expect_error("file_not_found", backend.unlink, f"{root}/missing")
        await backend.rmdir(f"{root}/empty")
        await backend.unlink(f"{root}/file")

    run_local(tmp_path, check)
    assert sorted(os.listdir(tmp_path)) == ["full"]


def test_rename_replaces_and_noreplace_rejects(tmp_path):
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    (tmp_path / "c").write_bytes(b"C")

    async def check(backend, root):
        await expect_error("already_exists", backend.rename, f"{root}/a", f"{root}/b", True)
        assert (tmp_path / "a").read_bytes() == b"A"
        assert (tmp_path / "b").read_bytes() == b"B"
        await backend.rename(f"{root}/a", f"{root}/b")
        await backend.rename(f"{root}/c", f"{root}/d", True)
        await expect_error("file_not_found", backend.rename, f"{root}/missing", f"{root}/e")

    run_local(tmp_path, check)
    assert sorted(os.listdir(tmp_path)) == ["b", "d"]
    assert (tmp_path / "b").read_bytes() == b"A"


@pytest.mark.parametrize("route", ["wrapper", "syscall", "check_then_rename"])
def test_rename_noreplace_routes(tmp_path, monkeypatch, route):
    from sandboxfs.remote import agent

    if route == "check_then_rename":
        function = None
    else:
        function = agent.load_renameat2(use_wrapper=route == "wrapper")
        if function is None:
            pytest.skip(f"no renameat2 {route} on this machine")
    monkeypatch.setattr(agent, "_renameat2", function)
    monkeypatch.setattr(agent, "_renameat2_loaded", True)
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    old = os.fsencode(tmp_path / "a")

    with pytest.raises(FileExistsError):
        agent.rename_noreplace(old, os.fsencode(tmp_path / "b"))
    with pytest.raises(FileNotFoundError):
        agent.rename_noreplace(os.fsencode(tmp_path / "missing"), os.fsencode(tmp_path / "c"))
    agent.rename_noreplace(old, os.fsencode(tmp_path / "c"))
    assert sorted(os.listdir(tmp_path)) == ["b", "c"]
    assert (tmp_path / "b").read_bytes() == b"B"


def test_symlink_and_link(tmp_path):
    (tmp_path / "file").write_bytes(b"data")

    async def check(backend, root):
        st = await backend.symlink("/etc/passwd", f"{root}/abs")
        assert st.is_symlink
        assert os.readlink(tmp_path / "abs") == "/etc/passwd"
        await backend.symlink("dangling target", f"{root}/rel")
        await expect_error("already_exists", backend.symlink, "x", f"{root}/rel")

        linked = await backend.link(f"{root}/file", f"{root}/hard")
        assert linked.nlink == 2
        assert linked.ino == os.stat(tmp_path / "file").st_ino
        await expect_error("already_exists", backend.link, f"{root}/file", f"{root}/hard")
        await expect_error("file_not_found", backend.link, f"{root}/missing", f"{root}/h2")

    run_local(tmp_path, check)


# Attributes.


def test_chmod_chown_utimens(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    os.symlink("file", tmp_path / "link")

    async def check(backend, root):
        await backend.chmod(f"{root}/file", 0o4711)
        assert stat.S_IMODE(os.stat(tmp_path / "file").st_mode) == 0o4711

        if os.geteuid() == 0:
            await backend.chown(f"{root}/file", 1234, None)
            await backend.chown(f"{root}/link", None, 4321)
            assert os.stat(tmp_path / "file").st_uid == 1234
            assert os.stat(tmp_path / "file").st_gid == os.getegid()
            assert os.lstat(tmp_path / "link").st_gid == 4321

        await backend.utimens(f"{root}/file", 1_000_000_123, 2_000_000_456)
        await backend.utimens(f"{root}/file", None, 3_000_000_789)
        result = os.stat(tmp_path / "file")
        assert result.st_atime_ns == 1_000_000_123
        assert result.st_mtime_ns == 3_000_000_789

        await backend.utimens(f"{root}/link", 5_000_000_000, 6_000_000_000)
        assert os.lstat(tmp_path / "link").st_mtime_ns == 6_000_000_000
        assert os.stat(tmp_path / "file").st_mtime_ns == 3_000_000_789

        await expect_error("file_not_found", backend.chmod, f"{root}/missing", 0o644)
        await expect_error("file_not_found", backend.utimens, f"{root}/missing", 1, 2)

    run_local(tmp_path, check)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the agent as another user")
def test_permission_denied_for_other_user(tmp_path):
    # Root bypasses mode bits, so a second agent runs as uid and gid 65534.
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if python is None:
        pytest.skip("no system python3 that user nobody can run")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "secret").write_bytes(b"")

    async def main():
        async with trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                agent_command(python),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                user=65534,
                group=65534,
                extra_groups=[],
                cwd="/",
            )
            backend = await connect(process.stdin, process.stdout, nursery, "/")
            try:
                assert backend.identity.uid == 65534
                await expect_error("permission_denied", backend.stat, f"{private}/secret")
                await expect_error("permission_denied", backend.mkdir, "/sbxtest-denied", 0o755)
            finally:
                await backend.aclose()
                await process.wait()

    trio.run(main)


# Names.

ODD_NAMES = [
    os.fsdecode(b"bad\xff\xfename"),
    "new\nline",
    "$(touch pwned)",
    "quote'\"`",
    " lead and trail ",
    "-dash",
    "\\back",
    "tab\there",
]


def test_odd_names_round_trip(tmp_path):
    (tmp_path / "d").mkdir()
    on_disk = b"disk\xff\x80"
    with open(os.fsencode(tmp_path / "d") + b"/" + on_disk, "wb") as file:
        file.write(b"from disk")

    async def check(backend, root):
        for index, name in enumerate(ODD_NAMES):
            path = f"{root}/d/{name}"
            await backend.write_file(path, str(index).encode())
            assert await backend.read_file(path) == str(index).encode()
            await backend.mkdir(f"{path}.dir", 0o755)
            await backend.symlink(name, f"{path}.link")
            assert await backend.readlink(f"{path}.link") == name

        names = {name for name, _ in await backend.list_dir(f"{root}/d")}
        assert os.fsdecode(on_disk) in names
        for name in ODD_NAMES:
            assert name in names
            assert f"{name}.dir" in names
        assert await backend.read_file(f"{root}/d/{os.fsdecode(on_disk)}") == b"from disk"

    run_local(tmp_path, check)
    raw = set(os.listdir(os.fsencode(tmp_path / "d")))
    assert b"bad\xff\xfename" in raw
    assert b"new\nline" in raw
    assert not (tmp_path / "pwned").exists()


def test_name_length_limit(tmp_path):
    async def check(backend, root):
        await backend.create(f"{root}/{'n' * 255}", 0o644)
        await expect_error("name_too_long", backend.create, f"{root}/{'n' * 256}", 0o644)
        await expect_error("name_too_long", backend.stat, f"{root}/{'é' * 128}")

    run_local(tmp_path, check)


def test_invalid_paths_are_rejected(tmp_path):
    async def check(backend, root):
        await expect_error("invalid_path", backend.stat, "relative/path")
        await expect_error("invalid_path", backend.stat, f"{root}/nul\0byte")
        await expect_error("invalid_path", backend.rename, f"{root}/a", "b")
        await expect_error("invalid_path", backend.symlink, "nul\0target", f"{root}/l")
        # A lone surrogate outside U+DC80..U+DCFF encodes to no byte string.
        await expect_error("invalid_path", backend.stat, f"{root}/\ud800")

    run_local(tmp_path, check)


# The wire protocol.


def test_malformed_requests_get_error_replies(tmp_path):
    (tmp_path / "file").write_bytes(b"x")

    async def check(backend, root):
        call = backend.channel.call
        await expect_error("invalid_argument", call, "no_such_op", {})
        await expect_error("invalid_argument", call, "stat", {"path": 5})
        await expect_error("invalid_argument", call, "stat", {})
        await expect_error("invalid_argument", call, "stat", {"path": root, "follow": 1})
        await expect_error("invalid_argument", call, "read", {"path": root, "offset": -1, "size": 1})
        await expect_error("invalid_argument", call, "read", {"path": root, "offset": 0, "size": 1 << 40})
        await expect_error("invalid_argument", call, "chmod", {"path": root, "mode": "755"})
        await expect_error("invalid_argument", call, "mkdir", {"path": root, "mode": True})
        assert (await backend.stat(f"{root}/file")).size == 1

    run_local(tmp_path, check)


def read_exact(stream, size):
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        assert chunk, "agent closed its output"
        data += chunk
    return data


def read_reply(stream):
    request_id, flags, message_size, payload_size = PREFIX.unpack(read_exact(stream, PREFIX.size))
    message = json.loads(read_exact(stream, message_size))
    payload = read_exact(stream, payload_size)
    return request_id, flags, message, payload


def frame(request_id, message, payload=b""):
    return PREFIX.pack(request_id, 0, len(message), len(payload)) + message + payload


def test_malformed_frames_do_not_stop_agent(tmp_path):
    (tmp_path / "file").write_bytes(b"abc")
    process = subprocess.Popen(
        agent_command(sys.executable), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        source = agent_source()
        process.stdin.write(struct.pack(">Q", len(source)) + source)
        requests = {
            1: frame(1, b"{not json"),
            2: frame(2, b"[1, 2]"),
            3: frame(3, b'{"op": "stat", "args": []}'),
            4: frame(4, b'{"op": 7}'),
            5: frame(5, b"\xff\xfe"),
            6: PREFIX.pack(6, 0, MAX_MESSAGE + 1, 0) + bytes(MAX_MESSAGE + 1),
        }
        for data in requests.values():
            process.stdin.write(data)
        stat_request = json.dumps({"op": "read", "args": {"path": f"{tmp_path}/file", "offset": 1, "size": 5}})
        process.stdin.write(frame(7, stat_request.encode()))
        process.stdin.flush()

        replies = {}
        for _ in range(7):
            request_id, flags, message, payload = read_reply(process.stdout)
            replies[request_id] = (flags, message, payload)

        for request_id in requests:
            flags, message, _ = replies[request_id]
            assert flags == 0
            assert message["error"]["code"] == "invalid_argument", (request_id, message)
        assert replies[7] == (0, {"ok": {}}, b"bc")

        process.stdin.close()
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_many_concurrent_calls_get_their_own_replies(tmp_path):
    count = 200
    for index in range(count):
        (tmp_path / f"f{index}").write_bytes(b"x" * index)

    async def check(backend, root):
        sizes = {}
        contents = {}

        async def stat_one(index):
            sizes[index] = (await backend.stat(f"{root}/f{index}")).size

        async def read_one(index):
            contents[index] = await backend.read(f"{root}/f{index}", 0, 1000)

        # The agent is stopped while the calls are sent, so all of them are
        # in flight at once; it answers them after SIGCONT.
        pid = backend.hello_info["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            async with trio.open_nursery() as nursery:
                for index in range(count):
                    nursery.start_soon(stat_one, index)
                    nursery.start_soon(read_one, index)
                await trio.testing.wait_all_tasks_blocked()
                assert backend.channel.pending_count == 2 * count
                os.kill(pid, signal.SIGCONT)
        finally:
            os.kill(pid, signal.SIGCONT)

        assert sizes == {index: index for index in range(count)}
        assert contents == {index: b"x" * index for index in range(count)}
        assert backend.channel.pending_count == 0

    run_local(tmp_path, check)


def test_killed_agent_fails_pending_calls(tmp_path):
    async def check(backend, root):
        pid = backend.hello_info["pid"]
        os.kill(pid, signal.SIGSTOP)
        codes = []

        async def stat_root():
            try:
                await backend.stat(root)
            except BackendError as exc:
                codes.append(exc.code)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(stat_root)
                await trio.testing.wait_all_tasks_blocked()
                assert backend.channel.pending_count == 10
                os.kill(pid, signal.SIGKILL)

        assert codes == ["unavailable"] * 10
        await expect_error("unavailable", backend.stat, root)

    run_local(tmp_path, check)


def test_missing_reply_times_out(tmp_path):
    async def check(backend, root):
        pid = backend.hello_info["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            await expect_error("timed_out", backend.stat, root)
        finally:
            os.kill(pid, signal.SIGCONT)
        # The late reply to the timed-out call is dropped; the channel works.
        assert (await backend.stat(root)).is_dir

    run_local(tmp_path, check, timeout=0.5)


def test_calls_after_aclose_are_unavailable(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            backend = await connect_local(nursery, str(tmp_path))
            pid = backend.hello_info["pid"]
            await backend.aclose()
            await expect_error("unavailable", backend.stat, str(tmp_path))
        return pid

    pid = trio.run(main)
    assert not os.path.exists(f"/proc/{pid}")


def test_cancelled_nursery_reaps_agent(tmp_path):
    async def main():
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                backend = await connect_local(nursery, str(tmp_path))
                pid = backend.hello_info["pid"]
                scope.cancel()
        return pid

    pid = trio.run(main)
    assert not os.path.exists(f"/proc/{pid}")


def test_channel_eof_fails_calls():
    async def main():
        host_send, agent_receive = trio.testing.memory_stream_one_way_pair()
        agent_send, host_receive = trio.testing.memory_stream_one_way_pair()
        channel = Channel(host_send, host_receive, timeout=None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.serve)
            nursery.start_soon(agent_send.aclose)
            with trio.fail_after(5):
                await expect_error("unavailable", channel.call, "stat", {"path": "/"})

    trio.run(main)


@pytest.mark.parametrize(
    "reply",
    [b"{not json", b"[" * 100000, b'{"ok": {"items": 5}}', b'{"neither": 1}'],
)
def test_channel_invalid_reply_fails_calls(reply):
    async def main():
        host_send, agent_receive = trio.testing.memory_stream_one_way_pair()
        agent_send, host_receive = trio.testing.memory_stream_one_way_pair()
        channel = Channel(host_send, host_receive, timeout=None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.serve)
            await agent_send.send_all(frame(1, reply))
            with trio.fail_after(5):
                error = await expect_error("unavailable", channel.call, "stat", {"path": "/"})
            assert "invalid data from the agent" in error.message
            await expect_error("unavailable", channel.call, "stat", {"path": "/"})

    trio.run(main)


# Connecting.


def test_connect_local_rejects_missing_root(tmp_path):
    (tmp_path / "file").write_bytes(b"")

    async def attempt(root):
        async with trio.open_nursery() as nursery:
            with pytest.raises(ConnectError) as info:
                await connect_local(nursery, root)
        return str(info.value)

    missing = tmp_path / "missing"
    assert trio.run(attempt, str(missing)) == (
        f"local directory '{missing}' does not exist: create it or check the path"
    )
    assert "is not a directory" in trio.run(attempt, str(tmp_path / "file"))


def test_connect_reports_missing_root_in_sandbox(tmp_path):
    # The check in `connect` itself, as the sandbox backends reach it.
    async def main():
        async with trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                agent_command(sys.executable), stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            with pytest.raises(ConnectError) as info:
                await connect(
                    process.stdin,
                    process.stdout,
                    nursery,
                    f"{tmp_path}/missing",
                    root_label="directory in container c1",
                )
            assert await process.wait() == 0
        return info

    info = trio.run(main)
    assert str(info.value) == (
        f"directory in container c1 '{tmp_path}/missing' does not exist: "
        "create it or check the path"
    )


def test_connect_reports_missing_python():
    async def main():
        async with trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                ["sh", "-c", "exit 127"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            with pytest.raises(ConnectError, match="agent did not start"):
                await connect(process.stdin, process.stdout, nursery, "/")
            await process.wait()

    trio.run(main)


OLD_PYTHON = "/root/.pyenv/versions/3.6.15/bin/python3.6"


@pytest.mark.skipif(not os.access(OLD_PYTHON, os.X_OK), reason="no Python 3.6 here")
def test_agent_on_python_3_6_in_c_locale(tmp_path):
    name = os.fsdecode(b"old\xff\xfe")

    async def main():
        async with trio.open_nursery() as nursery:
            environment = dict(os.environ, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0")
            process = await trio.lowlevel.open_process(
                agent_command(OLD_PYTHON),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=environment,
            )
            backend = await connect(process.stdin, process.stdout, nursery, str(tmp_path))
            try:
                assert backend.hello_info["python"].startswith("3.6.")
                await backend.write_file(f"{tmp_path}/{name}", b"six")
                assert [entry for entry, _ in await backend.list_dir(str(tmp_path))] == [name]
                await backend.rename(f"{tmp_path}/{name}", f"{tmp_path}/{name}2", True)
                assert await backend.read_file(f"{tmp_path}/{name}2") == b"six"
            finally:
                await backend.aclose()
                await process.wait()

    trio.run(main)
    assert os.listdir(os.fsencode(tmp_path)) == [b"old\xff\xfe2"]
