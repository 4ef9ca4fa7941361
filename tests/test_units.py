"""Unit tests of the pure helpers and of the in-memory backend.

Covers symlink containment, byte-range sets, the error-code tables, the
deepagents-compatible transfers of the Backend base class, mount sources,
and `MemoryBackend`, whose error codes and tree are compared with the agent's
on a real directory.
"""

from __future__ import annotations

import errno
import stat

import pytest
import trio

from sandboxfs.backend import (
    ERRNO_BY_CODE,
    BackendError,
    FileDownloadResponse,
    FileUploadResponse,
    Identity,
    code_for_errno,
    errno_for,
)
from sandboxfs.backends.local import connect_local
from sandboxfs.backends.memory import MAX_SYMLINK_HOPS, MemoryBackend
from sandboxfs.recovery import kept_copies
from sandboxfs.sources import Source, SourceError, parse_source
from sandboxfs.staging import RangeSet
from sandboxfs.symlinks import contain_target


def run(function, *args):
    """Run an async function with a deadline, so a hang fails the test."""

    async def main():
        with trio.fail_after(30):
            return await function(*args)

    return trio.run(main)


async def error_code(function, *args) -> str:
    with pytest.raises(BackendError) as info:
        await function(*args)
    return info.value.code


# contain_target: (target, link path, mount root, shown target or None).

CONTAINMENT_CASES = [
    ("a/b", "/work/x/link", "/work", "a/b"),
    ("./a", "/work/link", "/work", "./a"),
    ("d/", "/work/link", "/work", "d/"),
    ("../y", "/work/x/link", "/work", "../y"),
    ("../", "/work/x/link", "/work", "../"),
    ("..", "/work/link", "/work", None),
    ("../../y", "/work/x/link", "/work", None),
    ("a/../..", "/work/x/link", "/work", ".."),
    ("a/../../..", "/work/x/link", "/work", None),
    ("x/../../d/", "/work/x/link", "/work", "../d/"),
    ("/work/x/f", "/work/x/link", "/work", "../x/f"),
    ("/work/d/", "/work/link", "/work", "d/"),
    ("/work", "/work/x/link", "/work", ".."),
    ("/etc/passwd", "/work/link", "/work", None),
    ("/workshop/f", "/work/link", "/work", None),
    ("/", "/work/link", "/work", None),
    ("a", "/other/link", "/work", None),
    ("", "/work/link", "/work", None),
    ("/etc/passwd", "/x/link", "/", "../etc/passwd"),
    ("../../../etc", "/x/link", "/", "../etc"),
    ("..", "/link", "/", "."),
    ("/", "/work/link", "/", "../"),
]


@pytest.mark.parametrize("target, link, root, shown", CONTAINMENT_CASES)
def test_contain_target(target, link, root, shown):
    assert contain_target(target, link, root) == shown


# RangeSet.


def ranges_after(*added: tuple[int, int]) -> list[tuple[int, int]]:
    ranges = RangeSet()
    for start, end in added:
        ranges.add(start, end)
    return ranges.ranges


@pytest.mark.parametrize(
    "added, expected",
    [
        ([], []),
        ([(5, 5)], []),
        ([(7, 3)], []),
        ([(0, 10)], [(0, 10)]),
        ([(20, 30), (0, 10)], [(0, 10), (20, 30)]),
        ([(0, 10), (10, 20)], [(0, 20)]),
        ([(10, 20), (0, 10)], [(0, 20)]),
        ([(0, 10), (5, 15)], [(0, 15)]),
        ([(0, 100), (10, 20)], [(0, 100)]),
        ([(0, 10), (20, 30), (40, 50), (5, 45)], [(0, 50)]),
        ([(0, 10), (20, 30), (11, 19)], [(0, 10), (11, 19), (20, 30)]),
    ],
)
def test_rangeset_add(added, expected):
    assert ranges_after(*added) == expected


@pytest.mark.parametrize(
    "size, expected",
    [
        (100, [(0, 10), (20, 30)]),
        (30, [(0, 10), (20, 30)]),
        (25, [(0, 10), (20, 25)]),
        (20, [(0, 10)]),
        (5, [(0, 5)]),
        (0, []),
    ],
)
def test_rangeset_clip(size, expected):
    ranges = RangeSet()
    ranges.add(0, 10)
    ranges.add(20, 30)
    ranges.clip(size)
    assert ranges.ranges == expected


@pytest.mark.parametrize(
    "start, end, expected",
    [
        (0, 40, [(10, 20), (30, 40)]),
        (0, 10, []),
        (5, 25, [(10, 20)]),
        (12, 18, [(12, 18)]),
        (10, 20, [(10, 20)]),
        (20, 30, []),
        (25, 35, [(30, 35)]),
        (0, 0, []),
        (50, 60, [(50, 60)]),
    ],
)
def test_rangeset_gaps(start, end, expected):
    ranges = RangeSet()
    ranges.add(0, 10)
    ranges.add(20, 30)
    assert ranges.gaps(start, end) == expected


def test_rangeset_end_and_truth():
    ranges = RangeSet()
    assert not ranges
    assert ranges.end() == 0
    ranges.add(20, 30)
    ranges.add(0, 10)
    assert ranges
    assert ranges.end() == 30


# The error-code tables.


@pytest.mark.parametrize(
    "code, number",
    [
        ("file_not_found", errno.ENOENT),
        ("permission_denied", errno.EACCES),
        ("is_directory", errno.EISDIR),
        ("invalid_path", errno.EINVAL),
        ("not_a_directory", errno.ENOTDIR),
        ("already_exists", errno.EEXIST),
        ("not_empty", errno.ENOTEMPTY),
        ("name_too_long", errno.ENAMETOOLONG),
        ("invalid_argument", errno.EINVAL),
        ("timed_out", errno.EIO),
        ("unavailable", errno.ENOTCONN),
        ("no_such_code", errno.EIO),
        ("", errno.EIO),
        (None, errno.EIO),
    ],
)
def test_errno_for(code, number):
    assert errno_for(code) == number


@pytest.mark.parametrize(
    "number, code",
    [
        (errno.ENOENT, "file_not_found"),
        (errno.EACCES, "permission_denied"),
        (errno.EISDIR, "is_directory"),
        # EINVAL has two codes, and code_for_errno returns the deepagents one.
        (errno.EINVAL, "invalid_path"),
        (errno.ENOTDIR, "not_a_directory"),
        (errno.EEXIST, "already_exists"),
        (errno.ENOTEMPTY, "not_empty"),
        (errno.ENOSPC, "no_space"),
        (errno.ELOOP, "symlink_loop"),
        (errno.ENOTSUP, "not_supported"),
        (errno.EIO, "io_error"),
        (errno.ENXIO, "io_error"),
        (99999, "io_error"),
    ],
)
def test_code_for_errno(number, code):
    assert code_for_errno(number) == code


def test_code_for_errno_round_trips_every_errno():
    for number in set(ERRNO_BY_CODE.values()):
        assert errno_for(code_for_errno(number)) == number


# The deepagents-compatible transfers, on the in-memory backend.


def test_aupload_files_order_and_partial_success():
    backend = MemoryBackend(root="/work")

    async def check():
        await backend.mkdir("/work/dir", 0o755)
        await backend.write_file("/work/old", b"old contents, longer")
        responses = await backend.aupload_files(
            [
                ("/work/new", b"new"),
                ("relative/path", b"x"),
                ("/work/dir", b"x"),
                ("/work/missing/f", b"x"),
                ("/work/old", b"short"),
            ]
        )
        assert responses == [
            FileUploadResponse("/work/new", None),
            FileUploadResponse("relative/path", "invalid_path"),
            FileUploadResponse("/work/dir", "is_directory"),
            FileUploadResponse("/work/missing/f", "file_not_found"),
            FileUploadResponse("/work/old", None),
        ]
        assert await backend.read_file("/work/new") == b"new"
        assert await backend.read_file("/work/old") == b"short"

    run(check)


def test_adownload_files_order_and_partial_success():
    backend = MemoryBackend(root="/work", max_chunk=4)

    async def check():
        await backend.mkdir("/work/dir", 0o755)
        await backend.write_file("/work/a", b"0123456789")
        await backend.write_file("/work/empty", b"")
        await backend.symlink("a", "/work/link")
        responses = await backend.adownload_files(
            ["/work/link", "/work/missing", "work/a", "/work/dir", "/work/empty", "/work/a"]
        )
        assert responses == [
            FileDownloadResponse("/work/link", b"0123456789", None),
            FileDownloadResponse("/work/missing", None, "file_not_found"),
            FileDownloadResponse("work/a", None, "invalid_path"),
            FileDownloadResponse("/work/dir", None, "is_directory"),
            FileDownloadResponse("/work/empty", b"", None),
            FileDownloadResponse("/work/a", b"0123456789", None),
        ]

    run(check)


def test_aupload_files_reports_injected_error():
    backend = MemoryBackend(root="/work")
    backend.fail("write", "permission_denied")

    async def check():
        responses = await backend.aupload_files([("/work/a", b"x"), ("/work/b", b"y")])
        assert responses == [
            FileUploadResponse("/work/a", "permission_denied"),
            FileUploadResponse("/work/b", None),
        ]

    run(check)


# Mount sources.


@pytest.mark.parametrize(
    "text, source",
    [
        ("docker://box", Source("docker", "box", "/")),
        ("docker://my_box.1-a", Source("docker", "my_box.1-a", "/")),
        ("docker://box:/workspace", Source("docker", "box", "/workspace")),
        ("docker://box:/workspace/", Source("docker", "box", "/workspace")),
        ("docker://box://srv//data", Source("docker", "box", "/srv/data")),
        ("docker://alice@box:/home/alice", Source("docker", "box", "/home/alice", "alice")),
        ("docker://1000:1000@box", Source("docker", "box", "/", "1000:1000")),
        ("local:///tmp/dir", Source("local", "", "/tmp/dir")),
        ("local:///", Source("local", "", "/")),
    ],
)
def test_parse_source_accepts(text, source):
    assert parse_source(text) == source


@pytest.mark.parametrize(
    "text, named",
    [
        ("box", "'box'"),
        ("docker://-box", "'-box'"),
        ("docker://b", "'b'"),
        ("docker://my box", "'my box'"),
        ("docker://", "''"),
        ("docker://box:relative", "'relative'"),
        ("docker://box:/a/../etc", "'/a/../etc'"),
        ("docker://-u@box", "'-u'"),
        ("docker://al ice@box", "'al ice'"),
        ("local://relative/dir", "'relative/dir'"),
        ("local:///a/..", "'/a/..'"),
        ("ssh://host", "'ssh'"),
        ("DOCKER://box", "'DOCKER'"),
    ],
)
def test_parse_source_rejects(text, named):
    with pytest.raises(SourceError) as info:
        parse_source(text)
    message = str(info.value)
    assert "\n" not in message
    assert named in message


def test_source_str_round_trips():
    for text in ["docker://box", "docker://alice@box:/w", "local:///tmp/x"]:
        assert str(parse_source(text)) == text


# MemoryBackend against the agent on a real directory.
#
# Each case runs in a fresh copy of SETUP on both backends. The test compares
# the error code (or "ok") and the resulting tree: mode, size and link count.

SETUP = [
    ("mkdir", "d", 0o755),
    ("mkdir", "d/sub", 0o755),
    ("create", "d/sub/f", 0o644),
    ("mkdir", "empty", 0o755),
    ("create", "file", 0o644),
    ("write", "file", 0, b"hello"),
    ("symlink", "file", "lfile"),
    ("symlink", "d", "ldir"),
    ("symlink", "missing", "dangling"),
    ("symlink", "loop", "loop"),
    ("symlink", "/etc/passwd", "abs"),
    ("mknod", "fifo", stat.S_IFIFO | 0o644, 0),
    ("link", "file", "hard"),
]

LONG = "n" * 256

AGENT_CASES = [
    ("stat", "missing"),
    ("stat", "file/x"),
    ("stat", "dangling", True),
    ("stat", "loop", True),
    ("stat", "loop/x"),
    ("stat", "file/"),
    ("stat", "ldir/"),
    ("stat", "lfile/"),
    ("stat", LONG),
    ("stat", "é" * 128),
    ("stat", "x/" + LONG),
    ("stat", "d/sub/f/.."),
    ("stat", "d/sub/../sub/f"),
    ("readlink", "file"),
    ("readlink", "missing"),
    ("readlink", "ldir/"),
    ("read", "d", 0, 10),
    ("read", "fifo", 0, 10),
    ("read", "missing", 0, 1),
    ("read", "file", -1, 1),
    ("read", "lfile", 1, 3),
    ("write", "d", 0, b"x"),
    ("write", "fifo", 0, b"x"),
    ("write", "lfile", 8, b"x"),
    ("truncate", "d", 0),
    ("truncate", "fifo", 0),
    ("truncate", "file", -1),
    ("truncate", "lfile", 2),
    ("open_check", "d", False),
    ("open_check", "d", True),
    ("open_check", "fifo", False),
    ("open_check", "fifo", True),
    ("list_dir", "file"),
    ("list_dir", "missing"),
    ("list_dir", "ldir"),
    ("create", "file", 0o644),
    ("create", "dangling", 0o644),
    ("create", "dangling", 0o600, False),
    ("create", "d", 0o644, False),
    ("create", "newf/", 0o644, False),
    ("create", "file/", 0o644, False),
    ("create", "lfile", 0o644, True),
    ("create", "nodir/x", 0o644),
    ("create", "file/x", 0o644),
    ("create", LONG, 0o644),
    ("create", "n" * 255, 0o644),
    ("create", "ldir/new", 0o4755),
    ("mkdir", "d", 0o755),
    ("mkdir", "dangling", 0o755),
    ("mkdir", "dangling/", 0o755),
    ("mkdir", "file/", 0o755),
    ("mkdir", "d/.", 0o755),
    ("mkdir", "newdir/", 0o1777),
    ("mkdir", "nodir/x", 0o755),
    ("mknod", "d", stat.S_IFIFO | 0o644, 0),
    ("mknod", "newd", stat.S_IFDIR | 0o755, 0),
    ("mknod", "newbad", 0o170644, 0),
    ("mknod", "sock", stat.S_IFSOCK | 0o644, 0),
    ("mknod", "plain", 0o644, 0),
    ("unlink", "d"),
    ("unlink", "missing"),
    ("unlink", "file/"),
    ("unlink", "d/"),
    ("unlink", "ldir/"),
    ("unlink", "lfile/"),
    ("unlink", "hard"),
    ("unlink", "ldir"),
    ("rmdir", "d"),
    ("rmdir", "file"),
    ("rmdir", "ldir"),
    ("rmdir", "ldir/"),
    ("rmdir", "d/sub/."),
    ("rmdir", "d/sub/.."),
    ("rmdir", "missing"),
    ("rmdir", "empty"),
    ("rename", "missing", "x"),
    ("rename", "d", "d/sub/x"),
    ("rename", "d", "d"),
    ("rename", "d/sub", "d"),
    ("rename", "d", "file"),
    ("rename", "file", "d"),
    ("rename", "empty", "d"),
    ("rename", "d", "empty"),
    ("rename", "d/sub", "empty"),
    ("rename", "file", "hard"),
    ("rename", "file", "lfile", True),
    ("rename", "file", "lfile"),
    ("rename", "file", "nf/"),
    ("rename", "file/", "nf"),
    ("rename", "ldir/", "x"),
    ("rename", "d/", "x/"),
    ("rename", "d/.", "x"),
    ("rename", "d", "x/."),
    ("rename", "d/..", "x"),
    ("rename", "file", "nodir/x"),
    ("rename", "file", "d/sub/f"),
    ("rename", "lfile", "x"),
    ("symlink", "", "newl"),
    ("symlink", "t", "file"),
    ("symlink", "t", "newl/"),
    ("symlink", "t" * 4096, "newl"),
    ("symlink", "t", "nodir/x"),
    ("link", "d", "newlink"),
    ("link", "missing", "newlink"),
    ("link", "file", "d"),
    ("link", "d", "file"),
    ("link", "dangling", "newlink"),
    ("link", "file", "newlink/"),
    ("link", "file", "d/sub/second"),
    ("chmod", "missing", 0o644),
    ("chmod", "dangling", 0o644),
    ("chmod", "lfile", 0o4600),
    ("chmod", "d", 0o10000),
    ("chown", "missing", 0, 0),
    ("utimens", "missing", 1, 1),
    ("stat", "relative"),
    ("fsync", "missing"),
    ("statfs", "missing"),
]

# The positions of path arguments, by operation. Other arguments pass unchanged.
PATH_ARGUMENTS = {"symlink": (1,), "link": (0, 1), "rename": (0, 1)}


def absolute_args(base: str, operation: str, args: tuple) -> list:
    args = list(args)
    for index in PATH_ARGUMENTS.get(operation, (0,)):
        if args[index] != "relative":
            args[index] = f"{base}/{args[index]}"
    return args


async def tree_of(backend, directory: str) -> dict:
    found = {}
    for name, st in sorted(await backend.list_dir(directory)):
        size = 0 if st.is_dir else st.size
        found[name] = (oct(st.mode), size, st.nlink)
        if st.is_dir:
            found[name + "/"] = await tree_of(backend, f"{directory}/{name}")
    return found


async def outcomes_on(backend, root: str) -> list[tuple[str, dict]]:
    results = []
    for index, (operation, *args) in enumerate(AGENT_CASES):
        base = f"{root}/case{index}"
        await backend.mkdir(base, 0o755)
        for setup_operation, *setup_args in SETUP:
            await getattr(backend, setup_operation)(*absolute_args(base, setup_operation, setup_args))
        try:
            await getattr(backend, operation)(*absolute_args(base, operation, args))
        except BackendError as exc:
            code = exc.code
        else:
            code = "ok"
        results.append((code, await tree_of(backend, base)))
    return results


@pytest.fixture(scope="module")
def agent_and_memory_outcomes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("agent"))

    async def on_agent():
        async with trio.open_nursery() as nursery:
            backend = await connect_local(nursery, root)
            try:
                return await outcomes_on(backend, root)
            finally:
                await backend.aclose()

    agent = run(on_agent)
    memory = run(outcomes_on, MemoryBackend(root="/workspace"), "/workspace")
    return agent, memory


@pytest.mark.parametrize("index", range(len(AGENT_CASES)), ids=[" ".join(map(str, case))[:60] for case in AGENT_CASES])
def test_memory_backend_matches_agent(agent_and_memory_outcomes, index):
    agent, memory = agent_and_memory_outcomes
    agent_code, agent_tree = agent[index]
    memory_code, memory_tree = memory[index]
    assert memory_code == agent_code
    assert memory_tree == agent_tree


@pytest.mark.parametrize("hops, expected", [(MAX_SYMLINK_HOPS, "ok"), (MAX_SYMLINK_HOPS + 1, "symlink_loop")])
def test_symlink_hop_limit_matches_agent(tmp_path, hops, expected):
    async def chain_outcome(backend, root):
        await backend.create(f"{root}/target", 0o644)
        await backend.symlink("target", f"{root}/l0")
        for number in range(1, hops):
            await backend.symlink(f"l{number - 1}", f"{root}/l{number}")
        try:
            await backend.stat(f"{root}/l{hops - 1}", follow=True)
        except BackendError as exc:
            return exc.code
        return "ok"

    async def on_agent():
        async with trio.open_nursery() as nursery:
            backend = await connect_local(nursery, str(tmp_path))
            try:
                return await chain_outcome(backend, str(tmp_path))
            finally:
                await backend.aclose()

    assert run(on_agent) == expected
    assert run(chain_outcome, MemoryBackend(root="/w"), "/w") == expected


# MemoryBackend on its own: links, times, faults, the call record.


def test_memory_hard_links_share_one_inode():
    backend = MemoryBackend(root="/w")

    async def check():
        await backend.write_file("/w/a", b"one")
        linked = await backend.link("/w/a", "/w/b")
        assert linked.nlink == 2
        assert linked.ino == (await backend.stat("/w/a")).ino
        await backend.write("/w/b", 3, b"two")
        assert await backend.read_file("/w/a") == b"onetwo"
        await backend.unlink("/w/a")
        assert (await backend.stat("/w/b")).nlink == 1
        assert await backend.read_file("/w/b") == b"onetwo"

    run(check)


def test_memory_directory_link_counts():
    backend = MemoryBackend(root="/w")

    async def check():
        assert (await backend.mkdir("/w/d", 0o755)).nlink == 2
        await backend.mkdir("/w/d/a", 0o755)
        await backend.mkdir("/w/d/b", 0o755)
        assert (await backend.stat("/w/d")).nlink == 4
        await backend.rename("/w/d/b", "/w/b")
        assert (await backend.stat("/w/d")).nlink == 3
        assert (await backend.stat("/w")).nlink == 4
        await backend.rmdir("/w/d/a")
        assert (await backend.stat("/w/d")).nlink == 2

    run(check)


def test_memory_times_follow_changes():
    backend = MemoryBackend(root="/w")

    async def check():
        created = await backend.create("/w/f", 0o644)
        await backend.write("/w/f", 0, b"data")
        written = await backend.stat("/w/f")
        assert written.mtime_ns > created.mtime_ns
        assert written.ctime_ns == written.mtime_ns

        await backend.chmod("/w/f", 0o600)
        chmodded = await backend.stat("/w/f")
        assert chmodded.mtime_ns == written.mtime_ns
        assert chmodded.ctime_ns > written.ctime_ns

        await backend.rename("/w/f", "/w/g")
        renamed = await backend.stat("/w/g")
        assert renamed.ctime_ns > chmodded.ctime_ns
        assert renamed.mtime_ns == written.mtime_ns
        assert (await backend.stat("/w")).mtime_ns > chmodded.ctime_ns

        await backend.utimens("/w/g", 1_500_000_000_123_456_789, None)
        touched = await backend.stat("/w/g")
        assert touched.atime_ns == 1_500_000_000_123_456_789
        assert touched.mtime_ns == written.mtime_ns
        assert touched.ctime_ns > renamed.ctime_ns

        await backend.write("/w/g", 0, b"")
        assert (await backend.stat("/w/g")).mtime_ns == written.mtime_ns

    run(check)


def test_memory_symlinks_followed_only_where_posix_says():
    backend = MemoryBackend(root="/w")

    async def check():
        await backend.write_file("/w/f", b"abc")
        await backend.symlink("f", "/w/l")
        assert (await backend.stat("/w/l")).is_symlink
        assert (await backend.stat("/w/l", follow=True)).is_regular
        await backend.chmod("/w/l", 0o600)
        assert stat.S_IMODE((await backend.stat("/w/f")).mode) == 0o600
        await backend.chown("/w/l", 7, 8)
        assert (await backend.stat("/w/l")).uid == 7
        assert (await backend.stat("/w/f")).uid == 1000
        await backend.truncate("/w/l", 1)
        assert await backend.read("/w/l", 0, 10) == b"a"
        await backend.rename("/w/l", "/w/m")
        assert await backend.readlink("/w/m") == "f"
        await backend.unlink("/w/m")
        assert await backend.read_file("/w/f") == b"a"

    run(check)


def test_memory_chown_clears_set_id_bits():
    backend = MemoryBackend(root="/w")

    async def check():
        await backend.create("/w/f", 0o6755)
        await backend.chown("/w/f", 5, None)
        assert stat.S_IMODE((await backend.stat("/w/f")).mode) == 0o755
        await backend.mkdir("/w/d", 0o2755)
        await backend.chown("/w/d", 5, None)
        assert stat.S_IMODE((await backend.stat("/w/d")).mode) == 0o2755

    run(check)


def test_memory_setgid_directory_gives_its_group():
    backend = MemoryBackend(root="/w", identity=Identity(1000, 1000))

    async def check():
        await backend.mkdir("/w/shared", 0o2775)
        await backend.chown("/w/shared", None, 50)
        await backend.chmod("/w/shared", 0o2775)
        assert (await backend.create("/w/shared/f", 0o644)).gid == 50
        sub = await backend.mkdir("/w/shared/sub", 0o755)
        assert sub.gid == 50
        assert sub.mode & stat.S_ISGID
        assert (await backend.create("/w/plain", 0o644)).gid == 1000

    run(check)


def test_memory_fail_injects_errors_then_recovers():
    backend = MemoryBackend(root="/w")
    backend.fail("write", "no_space", times=2, after=1)

    async def check():
        await backend.create("/w/f", 0o644)
        await backend.write("/w/f", 0, b"a")
        assert await error_code(backend.write, "/w/f", 1, b"b") == "no_space"
        assert await error_code(backend.write, "/w/f", 1, b"b") == "no_space"
        await backend.write("/w/f", 1, b"c")
        assert await backend.read("/w/f", 0, 10) == b"ac"

    run(check)


def test_memory_records_calls():
    backend = MemoryBackend(root="/w")

    async def check():
        await backend.write_file("/w/f", b"xyz")
        writes = backend.calls_to("write")
        assert [call.args for call in writes] == [("/w/f", 0, b"xyz")]
        assert [call.operation for call in backend.calls] == ["create", "truncate", "write"]

    run(check)


def test_memory_closed_backend_is_unavailable():
    backend = MemoryBackend(root="/w")

    async def check():
        await backend.aclose()
        assert await error_code(backend.stat, "/w") == "unavailable"

    run(check)


def test_memory_root_is_owned_by_identity():
    backend = MemoryBackend(root="/srv/work/", identity=Identity(1234, 5678))
    assert backend.root == "/srv/work"

    async def check():
        root = await backend.stat("/srv/work")
        assert root.is_dir
        assert (root.uid, root.gid) == (1234, 5678)
        assert (await backend.stat("/")).uid == 0

    run(check)


# Copies kept in a recovery directory.


def test_kept_copies_read_their_notes(tmp_path):
    (tmp_path / "20260101-120000-a.txt-x1").write_bytes(b"12345")
    (tmp_path / "20260101-120000-a.txt-x1.source").write_text("sandbox path: /workspace/a.txt\nsize: 5\n")
    (tmp_path / "20260102-080000-b-x2").write_bytes(b"")
    copies = kept_copies(str(tmp_path))
    assert [(c.path.rsplit("/", 1)[1], c.size, c.sandbox_path) for c in copies] == [
        ("20260101-120000-a.txt-x1", 5, "/workspace/a.txt"),
        ("20260102-080000-b-x2", 0, ""),
    ]
    assert kept_copies(str(tmp_path / "missing")) == []
