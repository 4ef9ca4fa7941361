"""POSIX behaviour through a real mount, written once and run on every backend.

Each test works in a fresh directory (`workdir.mnt` through the mount,
`workdir.inside` in the sandbox) and checks both sides: what a program sees
through the mount and what the sandbox itself holds.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import stat
import subprocess

import pytest

from conftest import Workdir

libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE = 1


def errno_of(call, *args) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sandbox_sha256(workdir: Workdir, name: str) -> str:
    output = workdir.sandbox.run('sha256sum -- "$1"', f"{workdir.inside}/{name}").stdout
    return output.split()[0].decode()


# Data: copy in and out.


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 131073, (1 << 20) + 3, 64 << 20])
def test_cp_in_and_out_keeps_bytes(workdir, tmp_path, size):
    data = os.urandom(size) if size <= (1 << 20) + 3 else os.urandom(1 << 20) * 64
    source = tmp_path / "source.bin"
    source.write_bytes(data)

    subprocess.run(["cp", str(source), os.path.join(workdir.mnt, "copy.bin")], check=True)
    assert sandbox_sha256(workdir, "copy.bin") == sha256(data)

    back = tmp_path / "back.bin"
    subprocess.run(["cp", os.path.join(workdir.mnt, "copy.bin"), str(back)], check=True)
    assert sha256(back.read_bytes()) == sha256(data)
    assert os.stat(os.path.join(workdir.mnt, "copy.bin")).st_size == size


def test_file_written_in_sandbox_reads_through_mount(workdir):
    data = os.urandom(300_000)
    workdir.sandbox.write(f"{workdir.inside}/made-inside", data)
    with open(os.path.join(workdir.mnt, "made-inside"), "rb") as file:
        assert file.read() == data


def test_change_in_sandbox_seen_after_reopen(workdir):
    path = os.path.join(workdir.mnt, "f")
    with open(path, "wb") as file:
        file.write(b"first version")
    with open(path, "rb") as file:
        assert file.read() == b"first version"
    workdir.sandbox.write(f"{workdir.inside}/f", b"second version, longer")
    # Close-to-open: the attribute cache may be stale for up to its timeout.
    os.utime(workdir.mnt)
    subprocess.run(["sleep", "1.2"], check=True)
    with open(path, "rb") as file:
        assert file.read() == b"second version, longer"


def test_read_at_offsets(workdir):
    data = bytes(range(256)) * 4096
    workdir.sandbox.write(f"{workdir.inside}/r", data)
    fd = os.open(os.path.join(workdir.mnt, "r"), os.O_RDONLY)
    try:
        assert os.pread(fd, 10, 0) == data[:10]
        assert os.pread(fd, 5000, 777_777) == data[777_777:782_777]
        assert os.pread(fd, 100, len(data) - 10) == data[-10:]
        assert os.pread(fd, 100, len(data) + 10) == b""
    finally:
        os.close(fd)


def test_write_at_offset_keeps_other_bytes(workdir):
    data = os.urandom(200_000)
    workdir.sandbox.write(f"{workdir.inside}/w", data)
    fd = os.open(os.path.join(workdir.mnt, "w"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"XYZ", 100_000)
    finally:
        os.close(fd)
    expected = data[:100_000] + b"XYZ" + data[100_003:]
    assert workdir.sandbox.read(f"{workdir.inside}/w") == expected


def test_read_and_write_on_one_handle(workdir):
    data = os.urandom(50_000)
    workdir.sandbox.write(f"{workdir.inside}/rw", data)
    with open(os.path.join(workdir.mnt, "rw"), "r+b") as file:
        file.seek(1000)
        file.write(b"hello")
        file.flush()
        file.seek(0)
        assert file.read() == data[:1000] + b"hello" + data[1005:]


def test_append_with_shell_redirection(workdir):
    path = os.path.join(workdir.mnt, "log.txt")
    subprocess.run(["sh", "-c", 'echo one > "$1"; echo two >> "$1"; echo three >> "$1"', "sh", path], check=True)
    assert workdir.sandbox.read(f"{workdir.inside}/log.txt") == b"one\ntwo\nthree\n"


def test_truncate_shrinks_and_grows(workdir):
    path = os.path.join(workdir.mnt, "t")
    with open(path, "wb") as file:
        file.write(b"0123456789")
    os.truncate(path, 4)
    assert workdir.sandbox.read(f"{workdir.inside}/t") == b"0123"
    os.truncate(path, 8)
    assert workdir.sandbox.read(f"{workdir.inside}/t") == b"0123\0\0\0\0"
    assert os.stat(path).st_size == 8


def test_truncate_open_file_then_write(workdir):
    path = os.path.join(workdir.mnt, "t2")
    workdir.sandbox.write(f"{workdir.inside}/t2", b"a" * 100)
    with open(path, "r+b") as file:
        file.truncate(10)
        file.seek(20)
        file.write(b"b")
    assert workdir.sandbox.read(f"{workdir.inside}/t2") == b"a" * 10 + b"\0" * 10 + b"b"


def test_fsync_uploads_before_close(workdir):
    path = os.path.join(workdir.mnt, "synced")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        assert workdir.sandbox.read(f"{workdir.inside}/synced") == b"durable"
    finally:
        os.close(fd)


# Attributes.


def test_ls_la_shows_sandbox_attributes(workdir):
    workdir.sandbox.run('printf abc > "$1/f"; chmod 640 "$1/f"; mkdir "$1/d"; ln -s f "$1/l"', workdir.inside)
    listing = subprocess.run(["ls", "-la", workdir.mnt], capture_output=True, text=True, check=True).stdout
    lines = {line.split(None, 8)[8].split(" -> ")[0]: line for line in listing.splitlines()[1:]}
    assert lines["f"].startswith("-rw-r-----")
    assert lines["d"].startswith("d")
    assert lines["l"].startswith("l")
    assert lines["l"].endswith("l -> f")
    assert "." in lines
    assert ".." in lines

    st = os.stat(os.path.join(workdir.mnt, "f"))
    inside = workdir.sandbox.run('stat -c "%s %a %Y" -- "$1"', f"{workdir.inside}/f").stdout.split()
    assert st.st_size == int(inside[0]) == 3
    assert stat.S_IMODE(st.st_mode) == int(inside[1], 8) == 0o640
    assert int(st.st_mtime) == int(inside[2])


def test_chmod_changes_mode_in_sandbox(workdir):
    path = os.path.join(workdir.mnt, "c")
    open(path, "wb").close()
    os.chmod(path, 0o751)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o751
    assert workdir.sandbox.run('stat -c %a -- "$1"', f"{workdir.inside}/c").stdout.strip() == b"751"


def test_cp_preserve_of_read_only_file(workdir, tmp_path):
    source = tmp_path / "frozen.txt"
    source.write_bytes(b"read-only data\n" * 100)
    source.chmod(0o444)
    target = os.path.join(workdir.mnt, "frozen.txt")
    subprocess.run(["cp", "-p", str(source), target], check=True)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o444
    assert workdir.sandbox.read(f"{workdir.inside}/frozen.txt") == source.read_bytes()


def test_write_after_fchmod_read_only(workdir):
    # Permission is checked at open: a descriptor opened for writing keeps
    # writing after the file's mode drops the write bits.
    path = os.path.join(workdir.mnt, "locked")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before chmod, ")
        os.fchmod(fd, 0o400)
        os.write(fd, b"after chmod")
        os.fsync(fd)
    finally:
        os.close(fd)
    assert workdir.sandbox.read(f"{workdir.inside}/locked") == b"before chmod, after chmod"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400


def test_utime_sets_mtime(workdir):
    path = os.path.join(workdir.mnt, "u")
    with open(path, "wb") as file:
        file.write(b"x")
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    assert os.stat(path).st_mtime_ns // 10**9 == 1_500_000_000
    inside = workdir.sandbox.run('stat -c %Y -- "$1"', f"{workdir.inside}/u").stdout.strip()
    assert int(inside) == 1_500_000_000


def test_cp_preserve_keeps_mtime(workdir, tmp_path):
    source = tmp_path / "p"
    source.write_bytes(b"preserved")
    os.utime(source, ns=(1_400_000_000_000_000_000, 1_400_000_000_000_000_000))
    subprocess.run(["cp", "-p", str(source), os.path.join(workdir.mnt, "p")], check=True)
    inside = workdir.sandbox.run('stat -c %Y -- "$1"', f"{workdir.inside}/p").stdout.strip()
    assert int(inside) == 1_400_000_000


def test_statfs_reports_space(workdir):
    info = os.statvfs(workdir.mnt)
    assert info.f_blocks > 0
    assert info.f_namemax == 255


def test_xattrs_not_supported(workdir):
    path = os.path.join(workdir.mnt, "x")
    open(path, "wb").close()
    assert errno_of(os.getxattr, path, "user.test") == errno.ENOTSUP
    assert errno_of(os.setxattr, path, "user.test", b"v") == errno.ENOTSUP


# Directories and names.


def test_mkdir_p_and_rm_r(workdir):
    deep = os.path.join(workdir.mnt, "a", "b", "c")
    subprocess.run(["mkdir", "-p", deep], check=True)
    with open(os.path.join(deep, "f"), "w") as file:
        file.write("x")
    assert workdir.sandbox.read(f"{workdir.inside}/a/b/c/f") == b"x"
    subprocess.run(["rm", "-r", os.path.join(workdir.mnt, "a")], check=True)
    assert not os.path.exists(os.path.join(workdir.mnt, "a"))
    assert workdir.sandbox.run('[ -e "$1" ]', f"{workdir.inside}/a", check=False).returncode != 0


def test_listing_matches_sandbox(workdir):
    names = {f"file{i}" for i in range(50)}
    workdir.sandbox.run('cd "$1" && for i in $(seq 0 49); do : > file$i; done', workdir.inside)
    assert set(os.listdir(workdir.mnt)) == names


def test_mv_over_existing_file_replaces_it(workdir):
    old = os.path.join(workdir.mnt, "old")
    new = os.path.join(workdir.mnt, "new")
    with open(old, "w") as file:
        file.write("old content")
    with open(new, "w") as file:
        file.write("new content")
    subprocess.run(["mv", new, old], check=True)
    with open(old) as file:
        assert file.read() == "new content"
    assert not os.path.exists(new)
    assert workdir.sandbox.read(f"{workdir.inside}/old") == b"new content"


def test_rename_directory_moves_its_files(workdir):
    os.makedirs(os.path.join(workdir.mnt, "d1", "sub"))
    with open(os.path.join(workdir.mnt, "d1", "sub", "f"), "w") as file:
        file.write("inside")
    os.rename(os.path.join(workdir.mnt, "d1"), os.path.join(workdir.mnt, "d2"))
    with open(os.path.join(workdir.mnt, "d2", "sub", "f")) as file:
        assert file.read() == "inside"
    assert workdir.sandbox.read(f"{workdir.inside}/d2/sub/f") == b"inside"


def test_rename_noreplace_refuses_existing(workdir):
    for name in ("a", "b"):
        with open(os.path.join(workdir.mnt, name), "w") as file:
            file.write(name)
    result = libc.renameat2(
        -100, os.fsencode(os.path.join(workdir.mnt, "a")), -100, os.fsencode(os.path.join(workdir.mnt, "b")), RENAME_NOREPLACE
    )
    assert result == -1
    assert ctypes.get_errno() == errno.EEXIST
    assert workdir.sandbox.read(f"{workdir.inside}/b") == b"b"


HOSTILE_NAMES = [
    "with space",
    "quote'single",
    'quote"double',
    "new\nline",
    "$(touch pwned)",
    "`touch pwned`",
    "-leading-dash",
    "--",
    "semi;colon&amp|pipe",
    "star*question?",
    "é unicode ☃",
    "x" * 255,
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda name: repr(name)[:20])
def test_hostile_name_round_trips(workdir, name):
    path = os.path.join(workdir.mnt, name)
    with open(path, "wb") as file:
        file.write(b"content")
    assert name in os.listdir(workdir.mnt)
    assert workdir.sandbox.read(f"{workdir.inside}/{name}") == b"content"
    # An injected command would have created a file named "pwned".
    injected = workdir.sandbox.run('[ -e "$1/pwned" ] || [ -e pwned ]', workdir.inside, check=False)
    assert injected.returncode != 0
    renamed = os.path.join(workdir.mnt, "renamed")
    os.rename(path, renamed)
    os.rename(renamed, path)
    assert workdir.sandbox.read(f"{workdir.inside}/{name}") == b"content"
    os.unlink(path)
    assert os.listdir(workdir.mnt) == []


def test_non_utf8_name_round_trips(workdir):
    name = b"bytes-\xff\xfe-name"
    path = os.path.join(os.fsencode(workdir.mnt), name)
    with open(path, "wb") as file:
        file.write(b"raw")
    assert name in os.listdir(os.fsencode(workdir.mnt))
    made_inside = workdir.sandbox.run("cd \"$1\" && printf inside > \"$(printf 'in-\\377')\"", workdir.inside)
    assert made_inside.returncode == 0
    with open(os.path.join(os.fsencode(workdir.mnt), b"in-\xff"), "rb") as file:
        assert file.read() == b"inside"


def test_name_of_256_bytes_is_too_long(workdir):
    path = os.path.join(workdir.mnt, "y" * 256)
    assert errno_of(open, path, "w") == errno.ENAMETOOLONG
    assert errno_of(os.stat, path) == errno.ENAMETOOLONG


# Links.


def test_symlink_made_through_mount(workdir):
    os.symlink("target.txt", os.path.join(workdir.mnt, "link"))
    with open(os.path.join(workdir.mnt, "target.txt"), "w") as file:
        file.write("via link")
    assert os.readlink(os.path.join(workdir.mnt, "link")) == "target.txt"
    with open(os.path.join(workdir.mnt, "link")) as file:
        assert file.read() == "via link"
    assert workdir.sandbox.run('readlink -- "$1"', f"{workdir.inside}/link").stdout == b"target.txt\n"


def test_absolute_symlink_inside_mount_resolves_through_it(workdir):
    workdir.sandbox.run('printf data > "$1/real"; ln -s "$1/real" "$1/abs"', workdir.inside)
    shown = os.readlink(os.path.join(workdir.mnt, "abs"))
    assert not shown.startswith("/")
    with open(os.path.join(workdir.mnt, "abs")) as file:
        assert file.read() == "data"


def test_symlink_leaving_mount_never_reaches_host_file(workdir, tmp_path):
    host_file = tmp_path / "host-secret"
    host_file.write_text("host data")
    escaping = {
        "abs-out": str(host_file),
        "rel-out": "../" * 40 + str(host_file).lstrip("/"),
    }
    for name, target in escaping.items():
        workdir.sandbox.run('ln -s "$1" "$2"', target, f"{workdir.inside}/{name}")
    for name in escaping:
        path = os.path.join(workdir.mnt, name)
        try:
            with open(path, "w") as file:
                file.write("overwritten")
        except OSError:
            pass
        try:
            resolved = os.path.realpath(path)
        except OSError:
            resolved = ""
        assert not resolved.startswith(str(tmp_path))
    assert host_file.read_text() == "host data"


def test_hard_link(workdir):
    original = os.path.join(workdir.mnt, "orig")
    with open(original, "w") as file:
        file.write("shared")
    os.link(original, os.path.join(workdir.mnt, "hard"))
    assert os.stat(original).st_nlink == 2
    inode = workdir.sandbox.run('stat -c %i -- "$1" "$2"', f"{workdir.inside}/orig", f"{workdir.inside}/hard").stdout.split()
    assert inode[0] == inode[1]
    with open(os.path.join(workdir.mnt, "hard")) as file:
        assert file.read() == "shared"


# Errors.


def test_missing_file_is_enoent(workdir):
    assert errno_of(open, os.path.join(workdir.mnt, "missing")) == errno.ENOENT
    assert errno_of(os.unlink, os.path.join(workdir.mnt, "missing")) == errno.ENOENT
    assert errno_of(os.rmdir, os.path.join(workdir.mnt, "missing")) == errno.ENOENT


def test_open_directory_for_writing_is_eisdir(workdir):
    os.mkdir(os.path.join(workdir.mnt, "d"))
    assert errno_of(open, os.path.join(workdir.mnt, "d"), "w") == errno.EISDIR


def test_path_through_file_is_enotdir(workdir):
    open(os.path.join(workdir.mnt, "plain"), "w").close()
    assert errno_of(os.stat, os.path.join(workdir.mnt, "plain", "x")) == errno.ENOTDIR
    assert errno_of(os.mkdir, os.path.join(workdir.mnt, "plain", "x")) == errno.ENOTDIR


def test_rmdir_non_empty_is_enotempty(workdir):
    os.makedirs(os.path.join(workdir.mnt, "full", "child"))
    assert errno_of(os.rmdir, os.path.join(workdir.mnt, "full")) == errno.ENOTEMPTY


def test_create_existing_is_eexist(workdir):
    os.mkdir(os.path.join(workdir.mnt, "there"))
    assert errno_of(os.mkdir, os.path.join(workdir.mnt, "there")) == errno.EEXIST
    open(os.path.join(workdir.mnt, "file"), "w").close()
    assert errno_of(os.open, os.path.join(workdir.mnt, "file"), os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST


def test_unlink_directory_is_eisdir(workdir):
    os.mkdir(os.path.join(workdir.mnt, "dir"))
    assert errno_of(os.unlink, os.path.join(workdir.mnt, "dir")) in (errno.EISDIR, errno.EPERM)


def test_rmdir_on_file_is_enotdir(workdir):
    open(os.path.join(workdir.mnt, "file"), "w").close()
    assert errno_of(os.rmdir, os.path.join(workdir.mnt, "file")) == errno.ENOTDIR


# Editors and agents.


def test_vim_save_keeps_bytes(workdir):
    vim = shutil.which("vim") or shutil.which("vim.tiny")
    assert vim, "vim is missing: scripts/testbed deps installs vim-tiny"
    path = os.path.join(workdir.mnt, "edit.txt")
    with open(path, "w") as file:
        file.write("line one\nline two\n")
    # -u NONE: no user config; swap file, backup and fsync as vim does by default.
    subprocess.run(
        [
            vim, "-u", "NONE", "-i", "NONE", "-N", "-e", "-s",
            "-c", "set swapfile backup writebackup fsync backupcopy=auto",
            "-c", "2s/two/TWO/",
            "-c", "normal Goline three",
            "-c", "wq",
            path,
        ],
        check=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert workdir.sandbox.read(f"{workdir.inside}/edit.txt") == b"line one\nline TWO\nline three\n"
    leftovers = [name for name in os.listdir(workdir.mnt) if name != "edit.txt"]
    assert leftovers in ([], ["edit.txt~"])


def test_write_temp_then_rename_save(workdir):
    path = os.path.join(workdir.mnt, "config.json")
    with open(path, "w") as file:
        file.write('{"version": 1}')
    temp = path + ".tmp"
    with open(temp, "w") as file:
        file.write('{"version": 2}')
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    with open(path) as file:
        assert file.read() == '{"version": 2}'
    assert workdir.sandbox.read(f"{workdir.inside}/config.json") == b'{"version": 2}'


def test_truncate_and_rewrite_save(workdir):
    path = os.path.join(workdir.mnt, "notes.txt")
    with open(path, "w") as file:
        file.write("a long first version of the file\n" * 100)
    with open(path, "r+") as file:
        file.truncate(0)
        file.write("short\n")
    assert workdir.sandbox.read(f"{workdir.inside}/notes.txt") == b"short\n"


def test_unlinked_open_file_keeps_written_bytes(workdir):
    path = os.path.join(workdir.mnt, "scratch")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"still here")
        os.unlink(path)
        assert os.pread(fd, 100, 0) == b"still here"
        assert not os.path.exists(path)
    finally:
        os.close(fd)
    assert os.listdir(workdir.mnt) == []
