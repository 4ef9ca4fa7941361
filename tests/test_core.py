"""Tests of the filesystem core driven directly, without FUSE, on MemoryBackend.

Each test builds a `FilesystemCore` over a `MemoryBackend` whose root is
/workspace, runs its steps with trio.run, and checks what the core returns,
what the in-memory sandbox contains and which backend calls it received.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
import trio
import trio.testing

from sandboxfs.backend import BackendError, Identity
from sandboxfs.backends.memory import MemoryBackend
from sandboxfs.core import HIDDEN_DIR, Changes, FilesystemCore, FsError
from sandboxfs.inodes import ROOT_INODE
from sandboxfs.options import MountOptions

ROOT = "/workspace"
KiB = 1 << 10
MiB = 1 << 20
# The sandbox user differs from the user running the tests, so id mapping shows.
SANDBOX_USER = Identity(os.getuid() + 1000, os.getgid() + 1000)


def make_core(tmp_path, backend=None, **options) -> FilesystemCore:
    backend = backend or MemoryBackend(root=ROOT, identity=SANDBOX_USER)
    mount_options = MountOptions(
        staging_dir=str(tmp_path / "staging"),
        recovery_dir=str(tmp_path / "recovery"),
        **options,
    )
    return FilesystemCore(backend, mount_options)


def run(function, *args):
    """Run an async test body with a deadline, so a hang fails the test."""

    async def main():
        with trio.fail_after(10):
            return await function(*args)

    return trio.run(main)


async def fs_errno(function, *args) -> int:
    with pytest.raises(FsError) as info:
        await function(*args)
    return info.value.errno


async def backend_code(function, *args) -> str:
    with pytest.raises(BackendError) as info:
        await function(*args)
    return info.value.code


async def put(core: FilesystemCore, name: str, data: bytes) -> None:
    await core.backend.write_file(f"{ROOT}/{name}", data)


async def sandbox_bytes(core: FilesystemCore, name: str) -> bytes:
    return await core.backend.read_file(f"{ROOT}/{name}")


async def open_file(core: FilesystemCore, name: str, flags: int = os.O_RDWR) -> int:
    node, _ = await core.lookup(ROOT_INODE, name)
    fh, _ = await core.open(node.ino, flags)
    return fh


def written_bytes(backend: MemoryBackend) -> int:
    return sum(len(call.args[2]) for call in backend.calls_to("write"))


def recovery_copies(tmp_path) -> list[str]:
    directory = tmp_path / "recovery"
    if not directory.exists():
        return []
    return sorted(str(path) for path in directory.iterdir() if not path.name.endswith(".source"))


# Lookup counts and forget.


def test_forget_drops_node_at_zero_lookups(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "f", b"x")
        node, _ = await core.lookup(ROOT_INODE, "f")
        again, _ = await core.lookup(ROOT_INODE, "f")
        assert again is node
        assert node.lookups == 2

        core.forget([(node.ino, 1)])
        assert core.table.get(node.ino) is node
        core.forget([(node.ino, 1)])
        assert core.table.get(node.ino) is None
        assert core.table.child(core.table.root, "f") is None
        assert len(core.table) == 1

    run(check)


def test_forget_keeps_parent_of_referenced_child(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await core.backend.mkdir(f"{ROOT}/d", 0o755)
        await core.backend.mkdir(f"{ROOT}/d/e", 0o755)
        await put(core, "d/e/f", b"x")
        d, _ = await core.lookup(ROOT_INODE, "d")
        e, _ = await core.lookup(d.ino, "e")
        f, _ = await core.lookup(e.ino, "f")

        core.forget([(d.ino, 1), (e.ino, 1)])
        assert core.table.get(d.ino) is d
        assert core.table.get(e.ino) is e
        assert core.table.path(f) == f"{ROOT}/d/e/f"

        core.forget([(f.ino, 1)])
        assert core.table.get(f.ino) is None
        assert core.table.get(e.ino) is None
        assert core.table.get(d.ino) is None
        assert len(core.table) == 1

    run(check)


def test_forget_keeps_node_while_handle_open(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "f", b"x")
        node, _ = await core.lookup(ROOT_INODE, "f")
        fh, _ = await core.open(node.ino, os.O_RDONLY)
        core.forget([(node.ino, 1)])
        assert core.table.get(node.ino) is node
        assert await core.read(fh, 0, 10) == b"x"
        await core.release(fh)
        assert core.table.get(node.ino) is None

    run(check)


def test_created_entries_count_one_lookup(tmp_path):
    core = make_core(tmp_path)

    async def check():
        directory, _ = await core.mkdir(ROOT_INODE, "d", 0o755)
        fh, file_node, _ = await core.create(directory.ino, "f", stat.S_IFREG | 0o644, os.O_WRONLY)
        link, _ = await core.symlink(directory.ino, "l", "f")
        assert (directory.lookups, file_node.lookups, link.lookups) == (1, 1, 1)
        await core.release(fh)
        core.forget([(file_node.ino, 1), (link.ino, 1)])
        assert core.table.get(file_node.ino) is None
        assert core.table.get(link.ino) is None
        assert directory.children == 0

    run(check)


def test_getattr_of_forgotten_inode_is_stale(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "f", b"x")
        node, _ = await core.lookup(ROOT_INODE, "f")
        core.forget([(node.ino, 1)])
        assert await fs_errno(core.getattr, node.ino) == errno.ESTALE

    run(check)


# Rename.


def test_rename_moves_subtree(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await core.backend.mkdir(f"{ROOT}/a", 0o755)
        await core.backend.mkdir(f"{ROOT}/a/b", 0o755)
        await put(core, "a/b/c", b"deep")
        await core.backend.mkdir(f"{ROOT}/z", 0o755)
        a, _ = await core.lookup(ROOT_INODE, "a")
        b, _ = await core.lookup(a.ino, "b")
        c, _ = await core.lookup(b.ino, "c")
        z, _ = await core.lookup(ROOT_INODE, "z")

        await core.rename(ROOT_INODE, "a", z.ino, "moved", noreplace=False)
        assert core.table.path(a) == f"{ROOT}/z/moved"
        assert core.table.path(c) == f"{ROOT}/z/moved/b/c"
        assert core.table.child(core.table.root, "a") is None
        assert core.table.child(z, "moved") is a

        fh, _ = await core.open(c.ino, os.O_RDONLY)
        assert await core.read(fh, 0, 100) == b"deep"
        await core.release(fh)
        assert await sandbox_bytes(core, "z/moved/b/c") == b"deep"

    run(check)


def test_rename_over_existing_detaches_old_node(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "new", b"new contents")
        await put(core, "old", b"old")
        new, _ = await core.lookup(ROOT_INODE, "new")
        old, _ = await core.lookup(ROOT_INODE, "old")

        await core.rename(ROOT_INODE, "new", ROOT_INODE, "old", noreplace=False)
        assert old.detached
        assert not new.detached
        assert core.table.child(core.table.root, "old") is new
        # ESTALE makes the kernel look the name up again and open the new file.
        assert await fs_errno(core.open, old.ino, os.O_RDONLY) == errno.ESTALE
        _, shown = await core.getattr(new.ino)
        assert shown.size == len(b"new contents")
        assert await sandbox_bytes(core, "old") == b"new contents"

        core.forget([(old.ino, 1)])
        assert core.table.get(old.ino) is None
        assert core.table.child(core.table.root, "old") is new

    run(check)


def test_rename_noreplace_keeps_both(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "a", b"A")
        await put(core, "b", b"B")
        a, _ = await core.lookup(ROOT_INODE, "a")
        b, _ = await core.lookup(ROOT_INODE, "b")
        assert await backend_code(core.rename, ROOT_INODE, "a", ROOT_INODE, "b", True) == "already_exists"
        assert core.table.child(core.table.root, "a") is a
        assert core.table.child(core.table.root, "b") is b
        assert not b.detached

    run(check)


def test_rename_refreshes_ctime(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "a", b"A")
        node, before = await core.lookup(ROOT_INODE, "a")
        await core.rename(ROOT_INODE, "a", ROOT_INODE, "b", noreplace=False)
        _, after = await core.getattr(node.ino)
        assert after.ctime_ns > before.ctime_ns

    run(check)


# Staged writes and uploads.


def test_flush_uploads_only_dirty_ranges(tmp_path):
    core = make_core(tmp_path)
    backend = core.backend
    reference = bytearray(os.urandom(MiB))

    async def check():
        await put(core, "f", bytes(reference))
        fh = await open_file(core, "f")
        backend.calls.clear()
        await core.write(fh, 10, b"hello")
        await core.write(fh, 500_000, b"abc")
        await core.write(fh, 12, b"XY")
        reference[10:15] = b"hello"
        reference[500_000:500_003] = b"abc"
        reference[12:14] = b"XY"
        assert backend.calls == []

        await core.flush(fh)
        writes = backend.calls_to("write")
        assert [(call.args[1], len(call.args[2])) for call in writes] == [(10, 5), (500_000, 3)]
        assert backend.calls_to("read") == []
        assert backend.calls_to("truncate") == []
        assert await sandbox_bytes(core, "f") == bytes(reference)

        backend.calls.clear()
        await core.flush(fh)
        await core.release(fh)
        assert backend.calls_to("write") == []

    run(check)


def test_append_to_large_file_sends_only_tail(tmp_path):
    backend = MemoryBackend(root=ROOT, identity=SANDBOX_USER, max_chunk=256 * KiB)
    core = make_core(tmp_path, backend)
    base = os.urandom(4 * MiB)
    tail = os.urandom(300 * KiB)

    async def check():
        await put(core, "big", base)
        fh = await open_file(core, "big", os.O_WRONLY | os.O_APPEND)
        backend.calls.clear()
        await core.write(fh, len(base), tail)
        await core.release(fh)

        assert written_bytes(backend) == len(tail)
        assert [call.args[1] for call in backend.calls_to("write")] == [len(base), len(base) + 256 * KiB]
        assert backend.calls_to("read") == []
        assert await sandbox_bytes(core, "big") == base + tail

    run(check)


def test_truncate_down_then_extend_gives_zeros(tmp_path):
    core = make_core(tmp_path)
    original = os.urandom(10_000)
    local = tmp_path / "reference"
    local.write_bytes(original)

    async def check():
        await put(core, "f", original)
        node, _ = await core.lookup(ROOT_INODE, "f")
        fh, _ = await core.open(node.ino, os.O_RDWR)
        with open(local, "r+b") as reference:
            steps = [("write", 100, b"A" * 50), ("size", 120), ("size", 5000), ("write", 4000, b"B" * 10), ("size", 7000)]
            for step in steps:
                if step[0] == "write":
                    await core.write(fh, step[1], step[2])
                    reference.seek(step[1])
                    reference.write(step[2])
                else:
                    await core.setattr(node.ino, Changes(size=step[1]))
                    reference.truncate(step[1])
            reference.flush()
            expected = local.read_bytes()

            _, shown = await core.getattr(node.ino)
            assert shown.size == 7000
            assert await core.read(fh, 0, 10_000) == expected
            await core.release(fh)

        assert await sandbox_bytes(core, "f") == expected
        assert expected[120:4000] == bytes(3880)
        assert expected[4010:] == bytes(2990)

    run(check)


def test_read_through_dirty_handle_merges_base(tmp_path):
    backend = MemoryBackend(root=ROOT, identity=SANDBOX_USER, max_chunk=64)
    core = make_core(tmp_path, backend)
    base = bytes(range(256)) * 4

    async def check():
        await put(core, "f", base)
        fh = await open_file(core, "f")
        await core.write(fh, 100, b"*" * 20)
        await core.write(fh, len(base) + 10, b"tail")
        expected = base[:100] + b"*" * 20 + base[120:] + bytes(10) + b"tail"

        backend.calls.clear()
        assert await core.read(fh, 0, 4096) == expected
        assert await core.read(fh, 90, 40) == expected[90:130]
        # The base was fetched once and is kept locally: no second read.
        reads = backend.calls_to("read")
        assert sum(call.args[2] for call in reads) <= len(base)
        backend.calls.clear()
        assert await core.read(fh, 0, 4096) == expected
        assert backend.calls_to("read") == []
        # Nothing was uploaded by reading.
        assert await sandbox_bytes(core, "f") == base

        await core.release(fh)
        assert await sandbox_bytes(core, "f") == expected

    run(check)


def test_two_handles_share_one_staged_file(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "f", b"0123456789")
        node, _ = await core.lookup(ROOT_INODE, "f")
        writer, _ = await core.open(node.ino, os.O_WRONLY)
        reader, keep_cache = await core.open(node.ino, os.O_RDONLY)
        await core.write(writer, 2, b"ab")
        assert await core.read(reader, 0, 100) == b"01ab456789"

        second_writer, keep_cache = await core.open(node.ino, os.O_RDWR)
        assert keep_cache
        await core.write(second_writer, 8, b"yz!")
        staged = node.dirty
        assert staged is not None
        assert await core.read(writer, 0, 100) == b"01ab4567yz!"

        await core.release(writer)
        assert await sandbox_bytes(core, "f") == b"01ab4567yz!"
        assert node.dirty is staged
        await core.release(second_writer)
        await core.release(reader)
        assert node.dirty is None

    run(check)


def test_upload_failure_keeps_recovery_copy(tmp_path):
    core = make_core(tmp_path)
    backend = core.backend
    data = os.urandom(3 * MiB + 17)

    async def check():
        fh, node, _ = await core.create(ROOT_INODE, "report.bin", stat.S_IFREG | 0o644, os.O_WRONLY)
        for offset in range(0, len(data), 100_000):
            await core.write(fh, offset, data[offset : offset + 100_000])
        backend.fail("write", "io_error", after=1)

        assert await fs_errno(core.flush, fh) == errno.EIO
        copies = recovery_copies(tmp_path)
        assert len(copies) == 1
        with open(copies[0], "rb") as copy:
            assert copy.read() == data
        with open(copies[0] + ".source", encoding="utf-8") as note:
            text = note.read()
        assert f"sandbox path: {ROOT}/report.bin\n" in text
        assert f"size: {len(data)}\n" in text
        assert "bytes holding data" not in text

        # The data is still pending: a later flush sends all of it.
        assert node.dirty.needs_upload
        await core.flush(fh)
        assert await sandbox_bytes(core, "report.bin") == data
        assert not node.dirty.needs_upload
        await core.release(fh)

    run(check)


@pytest.mark.parametrize(
    "code, number",
    [("no_space", errno.ENOSPC), ("quota_exceeded", errno.EDQUOT), ("unavailable", errno.EIO), ("timed_out", errno.EIO)],
)
def test_upload_failure_errno(tmp_path, code, number):
    core = make_core(tmp_path)

    async def check():
        fh, _, _ = await core.create(ROOT_INODE, "f", stat.S_IFREG | 0o644, os.O_WRONLY)
        await core.write(fh, 0, b"data")
        core.backend.fail("write", code)
        assert await fs_errno(core.flush, fh) == number
        await core.release(fh)
        assert await sandbox_bytes(core, "f") == b"data"

    run(check)


def test_repeated_upload_failure_updates_one_copy(tmp_path):
    core = make_core(tmp_path)

    async def check():
        fh, _, _ = await core.create(ROOT_INODE, "f", stat.S_IFREG | 0o644, os.O_WRONLY)
        await core.write(fh, 0, b"first")
        core.backend.fail("write", "io_error", times=2)
        assert await fs_errno(core.flush, fh) == errno.EIO
        await core.write(fh, 5, b" second")
        assert await fs_errno(core.fsync, fh) == errno.EIO
        copies = recovery_copies(tmp_path)
        assert len(copies) == 1
        with open(copies[0], "rb") as copy:
            assert copy.read() == b"first second"
        await core.release(fh)
        assert await sandbox_bytes(core, "f") == b"first second"

    run(check)


def test_recovery_note_lists_known_ranges(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "f", b"x" * 1000)
        fh = await open_file(core, "f")
        await core.write(fh, 500, b"NEW")
        await core.write(fh, 1000, b"tail")
        core.backend.fail("write", "io_error")
        assert await fs_errno(core.flush, fh) == errno.EIO
        copies = recovery_copies(tmp_path)
        assert len(copies) == 1
        with open(copies[0], "rb") as copy:
            assert copy.read() == bytes(500) + b"NEW" + bytes(497) + b"tail"
        with open(copies[0] + ".source", encoding="utf-8") as note:
            text = note.read()
        assert f"sandbox path: {ROOT}/f\n" in text
        assert "size: 1004\n" in text
        assert "bytes holding data (others are unknown): 500-503 1000-1004\n" in text
        await core.release(fh)

    run(check)


def test_rename_of_dirty_file_uploads_to_new_name(tmp_path):
    core = make_core(tmp_path)

    async def check():
        fh, _, _ = await core.create(ROOT_INODE, "draft", stat.S_IFREG | 0o644, os.O_WRONLY)
        await core.write(fh, 0, b"saved")
        await core.rename(ROOT_INODE, "draft", ROOT_INODE, "final", noreplace=False)
        await core.release(fh)
        assert await sandbox_bytes(core, "final") == b"saved"
        assert await backend_code(core.backend.stat, f"{ROOT}/draft") == "file_not_found"

    run(check)


def test_unlinked_dirty_file_is_not_uploaded(tmp_path):
    core = make_core(tmp_path)

    async def check():
        fh, node, _ = await core.create(ROOT_INODE, "scratch", stat.S_IFREG | 0o644, os.O_WRONLY)
        await core.write(fh, 0, b"temporary")
        await core.unlink(ROOT_INODE, "scratch")
        core.backend.calls.clear()
        await core.flush(fh)
        await core.release(fh)
        assert core.backend.calls_to("write") == []
        assert core.backend.calls_to("create") == []
        assert recovery_copies(tmp_path) == []
        assert core.table.get(node.ino) is node
        core.forget([(node.ino, 1)])
        assert core.table.get(node.ino) is None

    run(check)


def test_upload_failure_at_truncate_is_eio(tmp_path):
    core = make_core(tmp_path)
    backend = core.backend

    async def check():
        await put(core, "f", b"0123456789")
        node, _ = await core.lookup(ROOT_INODE, "f")
        fh, _ = await core.open(node.ino, os.O_RDWR)
        await core.write(fh, 0, b"ab")
        await core.setattr(node.ino, Changes(size=4))
        backend.fail("truncate", "io_error")
        assert await fs_errno(core.fsync, fh) == errno.EIO
        assert await sandbox_bytes(core, "f") == b"0123456789"

        await core.fsync(fh)
        assert await sandbox_bytes(core, "f") == b"ab23"
        await core.release(fh)

    run(check)


def test_failed_release_leaves_recovery_copy(tmp_path):
    core = make_core(tmp_path)
    backend = core.backend

    async def check():
        fh, node, _ = await core.create(ROOT_INODE, "f", stat.S_IFREG | 0o644, os.O_WRONLY)
        await core.write(fh, 0, b"precious")
        backend.fail("write", "unavailable", times=100)
        await core.release(fh)
        assert node.dirty is None
        copies = recovery_copies(tmp_path)
        assert len(copies) == 1
        with open(copies[0], "rb") as copy:
            assert copy.read() == b"precious"

    run(check)


class GatedWriteBackend(MemoryBackend):
    """A MemoryBackend whose first write waits until `gate` is set."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gate = trio.Event()
        self.waiting = False

    async def write(self, path, offset, data):
        if not self.gate.is_set():
            self.waiting = True
            await self.gate.wait()
        await super().write(path, offset, data)


def test_writes_during_upload_are_not_lost(tmp_path):
    backend = GatedWriteBackend(root=ROOT, identity=SANDBOX_USER)
    core = make_core(tmp_path, backend)

    async def check():
        backend.gate.set()
        await put(core, "f", b"." * 100)
        backend.gate = trio.Event()
        node, _ = await core.lookup(ROOT_INODE, "f")
        fh, _ = await core.open(node.ino, os.O_RDWR)
        await core.write(fh, 0, b"first")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(core.flush, fh)
            await trio.testing.wait_all_tasks_blocked()
            assert backend.waiting
            # While the upload waits in write: overwrite what it is sending,
            # write elsewhere, and extend the file.
            await core.write(fh, 0, b"SECOND")
            await core.write(fh, 50, b"middle")
            await core.write(fh, 120, b"end")
            backend.gate.set()

        assert node.dirty.needs_upload
        await core.flush(fh)
        expected = b"SECOND" + b"." * 44 + b"middle" + b"." * 44 + bytes(20) + b"end"
        assert await sandbox_bytes(core, "f") == expected
        await core.release(fh)

    run(check)


def test_truncate_during_upload_is_not_lost(tmp_path):
    backend = GatedWriteBackend(root=ROOT, identity=SANDBOX_USER)
    core = make_core(tmp_path, backend)

    async def check():
        backend.gate.set()
        await put(core, "f", b"x" * 100)
        backend.gate = trio.Event()
        node, _ = await core.lookup(ROOT_INODE, "f")
        fh, _ = await core.open(node.ino, os.O_RDWR)
        await core.write(fh, 90, b"0123456789abc")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(core.flush, fh)
            await trio.testing.wait_all_tasks_blocked()
            await core.setattr(node.ino, Changes(size=10))
            backend.gate.set()

        await core.release(fh)
        assert await sandbox_bytes(core, "f") == b"x" * 10

    run(check)


def test_setattr_times_uploads_pending_writes_first(tmp_path):
    core = make_core(tmp_path)
    backend = core.backend
    mtime = 1_600_000_000_123_456_789

    async def check():
        fh, node, _ = await core.create(ROOT_INODE, "copy", stat.S_IFREG | 0o644, os.O_WRONLY)
        await core.write(fh, 0, b"copied bytes")
        backend.calls.clear()

        _, shown = await core.setattr(node.ino, Changes(atime_ns=mtime - 5, mtime_ns=mtime))
        operations = [call.operation for call in backend.calls]
        assert operations.index("write") < operations.index("utimens")
        assert shown.mtime_ns == mtime

        backend.calls.clear()
        await core.release(fh)
        assert backend.calls_to("write") == []
        st = await backend.stat(f"{ROOT}/copy")
        assert st.mtime_ns == mtime
        assert st.atime_ns == mtime - 5
        assert await sandbox_bytes(core, "copy") == b"copied bytes"

    run(check)


def test_open_with_trunc_empties_file(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "f", b"old contents")
        fh = await open_file(core, "f", os.O_WRONLY | os.O_TRUNC)
        assert await sandbox_bytes(core, "f") == b""
        await core.write(fh, 0, b"new")
        await core.release(fh)
        assert await sandbox_bytes(core, "f") == b"new"

    run(check)


def test_write_through_read_only_handle_is_ebadf(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "f", b"x")
        fh = await open_file(core, "f", os.O_RDONLY)
        assert await fs_errno(core.write, fh, 0, b"y") == errno.EBADF
        await core.release(fh)
        assert await fs_errno(core.read, fh, 0, 1) == errno.EBADF

    run(check)


def test_open_of_directory_is_eisdir(tmp_path):
    core = make_core(tmp_path)

    async def check():
        directory, _ = await core.mkdir(ROOT_INODE, "d", 0o755)
        assert await backend_code(core.open, directory.ino, os.O_RDONLY) == "is_directory"

    run(check)


def test_truncate_of_open_file_then_write(tmp_path):
    """ftruncate on a handle with no pending writes, then a write (`f.truncate(0)`)."""
    core = make_core(tmp_path)

    async def check():
        await put(core, "f", b"x" * 100)
        node, _ = await core.lookup(ROOT_INODE, "f")
        fh, _ = await core.open(node.ino, os.O_RDWR)
        await core.setattr(node.ino, Changes(size=0))
        await core.write(fh, 0, b"ab")
        _, shown = await core.getattr(node.ino)
        assert shown.size == 2
        assert await core.read(fh, 0, 100) == b"ab"
        await core.release(fh)
        assert await sandbox_bytes(core, "f") == b"ab"

    run(check)


def test_fsync_of_unlinked_open_file_succeeds(tmp_path):
    """fsync(2) on a descriptor of an unlinked file returns 0 on Linux."""
    core = make_core(tmp_path)

    async def check():
        fh, _, _ = await core.create(ROOT_INODE, "scratch", stat.S_IFREG | 0o644, os.O_RDWR)
        await core.write(fh, 0, b"temporary")
        await core.unlink(ROOT_INODE, "scratch")
        await core.fsync(fh)
        await core.release(fh)

    run(check)


def test_read_of_unlinked_file_with_local_data(tmp_path):
    """Bytes written through a handle stay readable after the name is unlinked."""
    core = make_core(tmp_path)

    async def check():
        fh, _, _ = await core.create(ROOT_INODE, "scratch", stat.S_IFREG | 0o644, os.O_RDWR)
        await core.write(fh, 0, b"temporary")
        await core.unlink(ROOT_INODE, "scratch")
        assert await core.read(fh, 0, 100) == b"temporary"
        await core.release(fh)

    run(check)


# Symlinks through the core.


@pytest.mark.parametrize(
    "link, target, shown",
    [
        ("l", "file", "file"),
        ("d/l", "../file", "../file"),
        ("d/l", f"{ROOT}/file", "../file"),
        ("l", f"{ROOT}/d/", "d/"),
        ("l", f"{ROOT}", "."),
        ("d/l", "x/../../file", "../file"),
    ],
)
def test_readlink_shows_contained_target(tmp_path, link, target, shown):
    core = make_core(tmp_path)

    async def check():
        await core.backend.mkdir(f"{ROOT}/d", 0o755)
        await core.backend.symlink(target, f"{ROOT}/{link}")
        parent = core.table.root
        if "/" in link:
            parent, _ = await core.lookup(ROOT_INODE, "d")
        node, _ = await core.lookup(parent.ino, link.rsplit("/", 1)[-1])
        assert await core.readlink(node.ino) == shown

    run(check)


@pytest.mark.parametrize("target", ["/etc/passwd", "..", "../../etc", "d/../../x", "/", "/workspace2/f"])
def test_readlink_escaping_target_is_eperm(tmp_path, target):
    core = make_core(tmp_path)

    async def check():
        await core.backend.mkdir(f"{ROOT}/d", 0o755)
        await core.backend.symlink(target, f"{ROOT}/l")
        node, _ = await core.lookup(ROOT_INODE, "l")
        assert await fs_errno(core.readlink, node.ino) == errno.EPERM

    run(check)


def test_readlink_raw_shows_target_unchanged(tmp_path):
    core = make_core(tmp_path, symlinks="raw")

    async def check():
        await core.backend.symlink("/etc/passwd", f"{ROOT}/l")
        node, _ = await core.lookup(ROOT_INODE, "l")
        assert await core.readlink(node.ino) == "/etc/passwd"

    run(check)


def test_symlink_through_core_stores_target_unchanged(tmp_path):
    core = make_core(tmp_path)

    async def check():
        node, shown = await core.symlink(ROOT_INODE, "l", "/etc/passwd")
        assert stat.S_ISLNK(shown.mode)
        assert await core.backend.readlink(f"{ROOT}/l") == "/etc/passwd"
        assert await fs_errno(core.readlink, node.ino) == errno.EPERM

    run(check)


# Ownership.


def test_idmap_user_shows_sandbox_user_as_local_user(tmp_path):
    core = make_core(tmp_path, idmap="user")

    async def check():
        await put(core, "mine", b"")
        await put(core, "other", b"")
        await core.backend.chown(f"{ROOT}/other", 0, 0)
        _, mine = await core.lookup(ROOT_INODE, "mine")
        _, other = await core.lookup(ROOT_INODE, "other")
        assert (mine.uid, mine.gid) == (os.getuid(), os.getgid())
        assert (other.uid, other.gid) == (0, 0)

    run(check)


def test_idmap_user_chown_maps_local_user_back(tmp_path):
    core = make_core(tmp_path, idmap="user")
    backend = core.backend

    async def check():
        await put(core, "f", b"")
        await backend.chown(f"{ROOT}/f", 0, 0)
        node, _ = await core.lookup(ROOT_INODE, "f")

        _, shown = await core.setattr(node.ino, Changes(uid=os.getuid(), gid=os.getgid()))
        st = await backend.stat(f"{ROOT}/f")
        assert (st.uid, st.gid) == (SANDBOX_USER.uid, SANDBOX_USER.gid)
        assert (shown.uid, shown.gid) == (os.getuid(), os.getgid())

        await core.setattr(node.ino, Changes(uid=4321))
        st = await backend.stat(f"{ROOT}/f")
        assert (st.uid, st.gid) == (4321, SANDBOX_USER.gid)

    run(check)


def test_idmap_none_shows_sandbox_ids(tmp_path):
    core = make_core(tmp_path, idmap="none")
    backend = core.backend

    async def check():
        await put(core, "f", b"")
        node, shown = await core.lookup(ROOT_INODE, "f")
        assert (shown.uid, shown.gid) == (SANDBOX_USER.uid, SANDBOX_USER.gid)
        await core.setattr(node.ino, Changes(uid=os.getuid()))
        assert (await backend.stat(f"{ROOT}/f")).uid == os.getuid()

    run(check)


# Names.


@pytest.mark.parametrize(
    "name, number",
    [
        ("n" * 256, errno.ENAMETOOLONG),
        ("é" * 128, errno.ENAMETOOLONG),
        ("a/b", errno.EINVAL),
        ("/", errno.EINVAL),
        ("", errno.EINVAL),
        (".", errno.EINVAL),
        ("..", errno.EINVAL),
        ("nul\0byte", errno.EINVAL),
    ],
)
def test_invalid_name_never_reaches_backend(tmp_path, name, number):
    core = make_core(tmp_path)
    backend = core.backend

    async def check():
        await core.backend.mkdir(f"{ROOT}/d", 0o755)
        backend.calls.clear()
        assert await fs_errno(core.lookup, ROOT_INODE, name) == number
        assert await fs_errno(core.mkdir, ROOT_INODE, name, 0o755) == number
        assert await fs_errno(core.create, ROOT_INODE, name, 0o644, os.O_WRONLY) == number
        assert await fs_errno(core.symlink, ROOT_INODE, name, "t") == number
        assert await fs_errno(core.unlink, ROOT_INODE, name) == number
        assert await fs_errno(core.rename, ROOT_INODE, "d", ROOT_INODE, name, False) == number
        assert backend.calls == []

    run(check)


def test_longest_and_odd_names_reach_backend(tmp_path):
    core = make_core(tmp_path)

    async def check():
        for name in ["n" * 255, "é" * 127 + "x", "with space", "new\nline", "$(x)", os.fsdecode(b"\xff\xfe")]:
            fh, node, _ = await core.create(ROOT_INODE, name, stat.S_IFREG | 0o644, os.O_WRONLY)
            await core.release(fh)
            found, _ = await core.lookup(ROOT_INODE, name)
            assert found is node
            assert (await core.backend.stat(f"{ROOT}/{name}")).is_regular

    run(check)


def test_lookup_of_missing_name_is_file_not_found(tmp_path):
    core = make_core(tmp_path)

    async def check():
        assert await backend_code(core.lookup, ROOT_INODE, "missing") == "file_not_found"
        assert core.table.child(core.table.root, "missing") is None

    run(check)


# Directories.


def test_opendir_lists_entries_and_keeps_node(tmp_path):
    core = make_core(tmp_path)

    async def check():
        directory, _ = await core.mkdir(ROOT_INODE, "d", 0o755)
        await put(core, "d/a", b"1")
        await core.backend.mkdir(f"{ROOT}/d/b", 0o755)
        fh = await core.opendir(directory.ino)
        names = sorted(name for name, _ in core.readdir_entries(fh))
        assert names == ["a", "b"]
        core.forget([(directory.ino, 1)])
        assert core.table.get(directory.ino) is directory
        core.releasedir(fh)
        assert core.table.get(directory.ino) is None

    run(check)


# Open files that lose their name through the mount.


async def list_names(core: FilesystemCore, path: str) -> list[str]:
    return sorted(name for name, _ in await core.backend.list_dir(path))


def test_unlinked_open_file_stays_readable_until_closed(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "log", b"old content")
        fh = await open_file(core, "log", os.O_RDONLY)
        await core.unlink(ROOT_INODE, "log")
        assert await core.read(fh, 0, 100) == b"old content"
        assert await list_names(core, ROOT) == [HIDDEN_DIR]
        assert len(await list_names(core, f"{ROOT}/{HIDDEN_DIR}")) == 1
        await core.release(fh)
        assert await list_names(core, ROOT) == []

    run(check)


def test_open_file_replaced_by_rename_reads_old_content(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "config", b"old content")
        await put(core, "config.tmp", b"new content, longer")
        fh = await open_file(core, "config", os.O_RDONLY)
        await core.rename(ROOT_INODE, "config.tmp", ROOT_INODE, "config", noreplace=False)
        assert await core.read(fh, 0, 100) == b"old content"
        assert await sandbox_bytes(core, "config") == b"new content, longer"
        await core.release(fh)
        assert await list_names(core, ROOT) == ["config"]

    run(check)


def test_without_hard_links_unlinked_open_file_reads_enoent(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "log", b"old content")
        fh = await open_file(core, "log", os.O_RDONLY)
        core.backend.fail("link", "not_permitted", times=2)
        await core.unlink(ROOT_INODE, "log")
        assert await fs_errno(core.read, fh, 0, 100) == errno.ENOENT
        await core.release(fh)
        assert await list_names(core, ROOT) == []

    run(check)


def test_failed_unlink_removes_the_hidden_name(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "log", b"content")
        fh = await open_file(core, "log", os.O_RDONLY)
        core.backend.fail("unlink", "permission_denied")
        assert await backend_code(core.unlink, ROOT_INODE, "log") == "permission_denied"
        assert await list_names(core, ROOT) == ["log"]
        assert await core.read(fh, 0, 100) == b"content"
        await core.release(fh)

    run(check)


def test_owner_writes_after_dropping_own_write_bit(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "locked", b"")
        fh = await open_file(core, "locked", os.O_WRONLY)
        node = core.handle(fh).node
        await core.write(fh, 0, b"before, ")
        await core.setattr(node.ino, Changes(mode=0o400))
        await core.write(fh, 8, b"after")
        # The sandbox checks permission at each write, as it does for a user
        # without CAP_DAC_OVERRIDE.
        core.backend.fail("write", "permission_denied")
        await core.flush(fh)
        await core.release(fh)
        assert await sandbox_bytes(core, "locked") == b"before, after"
        modes = [call.args[1] for call in core.backend.calls_to("chmod")]
        assert modes == [0o400, 0o600, 0o400]
        assert recovery_copies(tmp_path) == []

    run(check)


def test_write_bit_is_added_only_when_missing(tmp_path):
    core = make_core(tmp_path)

    async def check():
        await put(core, "shared", b"")
        fh = await open_file(core, "shared", os.O_WRONLY)
        await core.write(fh, 0, b"data")
        core.backend.fail("write", "permission_denied", times=2)
        assert await fs_errno(core.flush, fh) == errno.EIO
        assert core.backend.calls_to("chmod") == []
        assert len(recovery_copies(tmp_path)) == 1
        await core.release(fh)

    run(check)
