"""A backend for sandboxes that have only a POSIX shell and coreutils or busybox.

Each operation is one command, `sh -c SCRIPT sh ARG...`, run through an async
runner that the caller provides, so the same code serves Docker, Apptainer
and HTCondor. Paths and every other value travel only as positional
arguments; no value is ever pasted into the script text.

Arguments are encoded so that any byte string survives transports that carry
only UTF-8 text (the Docker Engine API sends argv as JSON, and its decoder
replaces invalid UTF-8 with U+FFFD). An argument that is valid UTF-8 is sent
as `x` + itself. Any other is sent as `e` + the `printf %b` octal escapes of
its bytes, which the script prelude decodes. Output comes back as raw bytes.

The scripts were checked against busybox 1.35 (ash) and GNU coreutils (dash).

Caveats:
- Timestamps have whole-second precision when the sandbox has busybox: its
  `stat` prints no nanoseconds and its `touch -d @SECONDS` takes no fraction.
  GNU `touch` is given the nanoseconds, but `stat` reads them back as seconds.
- Operations that need a check and then an action (exclusive create, write,
  truncate, symlink, link, rename) have a window between the two in which
  another process in the sandbox can change the path.
- `rename` uses `mv`, which copies across filesystems where rename(2) would
  fail with EXDEV.
- A command that hangs in the sandbox (a read of a FIFO) keeps running there
  after the call times out, because the runner cannot signal it.
"""

from __future__ import annotations

import logging
import os
import stat as stat_module
from collections.abc import Awaitable, Callable

import trio

from sandboxfs.backend import Backend, BackendError, ConnectError, Identity, Stat, StatFs

logger = logging.getLogger(__name__)

# run(argv, stdin) -> (exit status, stdout, stderr)
Runner = Callable[[list[str], bytes | None], Awaitable[tuple[int, bytes, bytes]]]

# Exit statuses the scripts use for errors they detect themselves. They are
# above the range that coreutils and busybox use (0-2) and below 126, which
# shells reserve for "cannot execute" and "not found".
_EXIT_CODES: dict[str, int] = {
    "ENOENT": 100,
    "ENOTDIR": 101,
    "EISDIR": 102,
    "EEXIST": 103,
    "EINVAL": 104,
    "EACCES": 105,
    "EPERM": 106,
}
_CODE_BY_EXIT: dict[int, str] = {
    100: "file_not_found",
    101: "not_a_directory",
    102: "is_directory",
    103: "already_exists",
    104: "invalid_argument",
    105: "permission_denied",
    106: "not_permitted",
}

# strerror texts as glibc and musl print them (busybox prints the libc's
# text), matched at the end of the last line of stderr.
_CODE_BY_MESSAGE: dict[str, str] = {
    "No such file or directory": "file_not_found",
    "Permission denied": "permission_denied",
    "Is a directory": "is_directory",
    "Not a directory": "not_a_directory",
    "File exists": "already_exists",
    "Directory not empty": "not_empty",
    "Read-only file system": "read_only",
    "No space left on device": "no_space",
    "Disk quota exceeded": "quota_exceeded",
    "Quota exceeded": "quota_exceeded",  # musl
    "File name too long": "name_too_long",
    "Filename too long": "name_too_long",  # musl
    "Operation not permitted": "not_permitted",
    "Too many levels of symbolic links": "symlink_loop",
    "Symbolic link loop": "symlink_loop",  # musl
    "Invalid argument": "invalid_argument",
    "File too large": "file_too_large",
    "Too many links": "too_many_links",
    "Invalid cross-device link": "cross_device",
    "Cross-device link": "cross_device",  # musl
    "Device or resource busy": "busy",
    "Resource busy": "busy",  # musl
    "Text file busy": "text_busy",
    "Operation not supported": "not_supported",
    "Not supported": "not_supported",  # musl
    "Input/output error": "io_error",
    "I/O error": "io_error",  # musl
}

# Messages of the shells and tools themselves, found anywhere in the last line
# of stderr when no strerror text ends it.
_CODE_BY_TOOL_MESSAGE: dict[str, str] = {
    "nonexistent directory": "file_not_found",  # busybox ash redirection
    "Directory nonexistent": "file_not_found",  # dash redirection
    "to a subdirectory of itself": "invalid_argument",  # GNU mv
    "invalid date": "invalid_argument",  # busybox touch
    "invalid number": "invalid_argument",  # busybox
}

_STAT_FORMAT = "%f %s %u %g %h %i %X %Y %Z %b %B %t %T"
_STATFS_FORMAT = "%s %S %b %f %a %c %d %l"

# Decodes the arguments (see the module docstring) and defines helpers.
# `missing` exits with the errno the kernel gives for a path that does not
# resolve: ENOTDIR when its deepest existing ancestor is not a directory,
# EACCES when that ancestor cannot be searched, ENOENT otherwise.
_PRELUDE = (
    "".join(f"{name}={number}\n" for name, number in _EXIT_CODES.items())
    + r"""
for a do
  shift
  case $a in
    x*) a=${a#x} ;;
    e*) a=$(printf '%bx' "${a#e}"); a=${a%x} ;;
  esac
  set -- "$@" "$a"
done
exists() { [ -e "$1" ] || [ -L "$1" ]; }
isdir() { [ -d "$1" ] && ! [ -L "$1" ]; }
# The kernel decides whether a directory can be searched: busybox's `[ -x ]`
# is false for root on a directory without x bits, where the kernel allows it.
searchable() { ( cd -- "$1" ) 2>/dev/null; }
# Exits with ENOTDIR when a directory of $1 below the mount root $R is a
# symlink: the kernel never sends a path through one, so the sandbox replaced
# a directory the kernel still has cached, and the path could lead out of
# the root. A check before the operation, as in the agent.
nolinks() {
  case $1 in "$R"/*) ;; *) return 0 ;; esac
  p=$R
  r=${1#"$R"/}
  r=${r%/}
  while :; do
    case $r in */*) ;; *) return 0 ;; esac
    p=$p/${r%%/*}
    r=${r#*/}
    ! [ -L "$p" ] || exit $ENOTDIR
  done
}
st() { stat -c '"""
    + _STAT_FORMAT
    + r"""' "$@"; }
missing() {
  m=$1
  while m=${m%/*}; [ -n "$m" ]; do
    if [ -e "$m" ]; then
      [ -d "$m" ] || exit $ENOTDIR
      searchable "$m" || exit $EACCES
      exit $ENOENT
    fi
  done
  exit $ENOENT
}
"""
)

_STAT = r"""
st $2 -- "$1"
"""

# Opens the file as open(2) would (read, or write without truncating), so
# that the shell reports the real error (EACCES, EROFS), then prints its stat.
_OPEN_CHECK = r"""
exists "$1" || missing "$1"
isdir "$1" && exit $EISDIR
if [ "$2" = w ]; then : >> "$1" || exit 1; else : < "$1" || exit 1; fi
st -L -- "$1"
"""

_IDENTITY = r"""
[ -e "$1" ] || missing "$1"
[ -d "$1" ] || exit $ENOTDIR
id -u && id -g
"""

# Prints "B COUNT", the entries' paths NUL-terminated, then one stat line per
# entry. When an entry vanished before the bulk stat, it prints "L" instead,
# then for each entry still there its stat line and its path NUL-terminated.
_LIST_DIR = r"""
d=$1
[ -e "$d" ] || missing "$d"
[ -d "$d" ] || exit $ENOTDIR
[ -r "$d" ] && searchable "$d" || exit $EACCES
set -- "$d"/* "$d"/.*
for p do
  shift
  case ${p##*/} in .|..) continue ;; esac
  exists "$p" || continue
  set -- "$@" "$p"
done
if [ $# -eq 0 ]; then
  printf 'B 0\n'
elif out=$(st -- "$@" 2>/dev/null); then
  printf 'B %d\n' $#
  printf '%s\0' "$@"
  printf '%s\n' "$out"
else
  printf 'L\n'
  for p do
    s=$(st -- "$p" 2>/dev/null) || continue
    printf '%s\n%s\0' "$s" "$p"
  done
fi
"""

_STATFS = r"""
stat -f -c '""" + _STATFS_FORMAT + r"""' -- "$1"
"""

_READLINK = r"""
if ! [ -L "$1" ]; then
  [ -e "$1" ] && exit $EINVAL
  missing "$1"
fi
readlink -- "$1"
"""

_READ = r"""
exec dd if="$1" iflag=skip_bytes,count_bytes skip="$2" count="$3" bs=262144 status=none
"""

# dd would create a missing file, and pwrite(2) on a missing file is ENOENT.
_WRITE = r"""
[ -e "$1" ] || missing "$1"
exec dd of="$1" oflag=seek_bytes seek="$2" conv=notrunc bs=262144 status=none
"""

_TRUNCATE = r"""
[ -e "$1" ] || missing "$1"
exec truncate -c -s "$2" -- "$1"
"""

# Arguments: path, mode (octal), exclusive (1 or 0). Busybox ash implements
# noclobber with a check, not O_EXCL, hence the explicit existence test.
_CREATE = r"""
if exists "$1"; then
  [ "$3" = 1 ] && exit $EEXIST
  [ -d "$1" ] && exit $EISDIR
  [ -e "$1" ] || : >> "$1" || exit
  st -L -- "$1"
  exit
fi
if ! (set -C; : > "$1"); then
  [ -d "${1%/*}/" ] || missing "$1"
  exit 1
fi
chmod "$2" -- "$1" || exit
st -- "$1"
"""

_MKDIR = r"""
mkdir -m "$2" -- "$1" && st -- "$1"
"""

_MKFIFO = r"""
mkfifo -m "$2" -- "$1" && st -- "$1"
"""

# Arguments: path, mode, type (b or c), major, minor.
_MKNOD_DEVICE = r"""
mknod -m "$2" -- "$1" "$3" "$4" "$5" && st -- "$1"
"""

_UNLINK = r"""
exists "$1" || missing "$1"
isdir "$1" && exit $EISDIR
exec rm -f -- "$1"
"""

_RMDIR = r"""
exec rmdir -- "$1"
"""

# Arguments: old, new, noreplace (1 or 0). A plain `mv old new` moves `old`
# into `new` when `new` is a directory or a symlink to one, so those cases
# go through `mv -T`. GNU mv -T always calls rename(2). Busybox mv -T calls
# it for a directory over a directory but rejects a non-directory over a
# symlink to a directory, so that symlink is removed first (not atomic).
# NOTE: noreplace is a check before `mv`, so a file created at `new` in
# between is replaced; rename(2) with RENAME_NOREPLACE has no such window.
_RENAME = r"""
exists "$1" || missing "$1"
[ "$1" = "$2" ] && exit 0
if exists "$2"; then
  [ "$3" = 1 ] && exit $EEXIST
  if isdir "$2"; then
    isdir "$1" || exit $EISDIR
    exec mv -f -T -- "$1" "$2"
  fi
  isdir "$1" && exit $ENOTDIR
  if [ -d "$2" ]; then
    mv -f -T -- "$1" "$2" 2>/dev/null && exit 0
    rm -f -- "$2" || exit
  fi
fi
exec mv -f -- "$1" "$2"
"""

# `ln` creates the link inside `$2` when `$2` is a directory.
_SYMLINK = r"""
exists "$2" && exit $EEXIST
ln -s -- "$1" "$2" && st -- "$2"
"""

_LINK = r"""
exists "$1" || missing "$1"
isdir "$1" && exit $EPERM
exists "$2" && exit $EEXIST
ln -- "$1" "$2" && st -- "$2"
"""

_CHMOD = r"""
exec chmod "$2" -- "$1"
"""

_CHOWN = r"""
exec chown -h "$2" -- "$1"
"""

# Arguments: path, atime seconds, atime nanoseconds, mtime seconds, mtime
# nanoseconds; an empty seconds value leaves that time alone.
# NOTE: nanoseconds are lost with busybox, whose touch rejects
# "@SECONDS.NANOSECONDS" and gets "@SECONDS". GNU touch keeps them, but
# `stat` here reads every time back in whole seconds.
_UTIMENS = r"""
p=$1
exists "$p" || missing "$p"
settime() {
  touch -c -h $1 -d "@$2.$3" -- "$p" 2>/dev/null || touch -c -h $1 -d "@$2" -- "$p"
}
if [ -n "$2" ] && [ "$2.$3" = "$4.$5" ]; then
  settime "" "$2" "$3"
  exit
fi
if [ -n "$2" ]; then settime -a "$2" "$3" || exit; fi
if [ -n "$4" ]; then settime -m "$4" "$5" || exit; fi
"""

_FSYNC = r"""
sync -- "$1" 2>/dev/null || sync
"""


def encode_argument(value: str) -> str:
    """Encode one argument for the prelude's decoder (see the module docstring)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return "x" + value

    parts = ["e"]
    for byte in os.fsencode(value):
        if 0x20 <= byte < 0x7F and byte != 0x5C:
            parts.append(chr(byte))
        else:
            parts.append(f"\\0{byte:03o}")
    return "".join(parts)


def parse_stat_line(line: bytes) -> Stat:
    """Parse one line that `stat -c` printed with the shell backend's format."""
    fields = line.split()
    if len(fields) != 13:
        raise ValueError(f"unexpected stat output: {line!r}")
    mode = int(fields[0], 16)
    block_count = int(fields[9])
    block_size = int(fields[10])
    return Stat(
        mode=mode,
        size=int(fields[1]),
        uid=int(fields[2]),
        gid=int(fields[3]),
        nlink=int(fields[4]),
        ino=int(fields[5]),
        rdev=os.makedev(int(fields[11], 16), int(fields[12], 16)),
        atime_ns=int(fields[6]) * 1_000_000_000,
        mtime_ns=int(fields[7]) * 1_000_000_000,
        ctime_ns=int(fields[8]) * 1_000_000_000,
        blocks=block_count * block_size // 512,
    )


def code_for_stderr(stderr: bytes) -> str | None:
    """Return the backend error code that a tool's error message names, if any."""
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    if not lines:
        return None
    last = lines[-1].rstrip()
    for message, code in _CODE_BY_MESSAGE.items():
        if last.endswith(message):
            return code
    for message, code in _CODE_BY_TOOL_MESSAGE.items():
        if message in last:
            return code
    return None


def _parse_list_dir(output: bytes) -> list[tuple[str, Stat]]:
    header, _, body = output.partition(b"\n")
    if header == b"L":
        return _parse_list_dir_per_entry(body)

    if not header.startswith(b"B "):
        raise ValueError(f"unexpected list output: {header!r}")
    count = int(header[2:])
    if count == 0:
        return []
    parts = body.split(b"\0", count)
    paths = parts[:count]
    stat_lines = parts[count].splitlines()
    if len(stat_lines) != count:
        raise ValueError(f"{count} entries but {len(stat_lines)} stat lines")
    return [
        (os.fsdecode(path.rsplit(b"/", 1)[-1]), parse_stat_line(line))
        for path, line in zip(paths, stat_lines)
    ]


def _parse_list_dir_per_entry(body: bytes) -> list[tuple[str, Stat]]:
    entries = []
    for record in body.split(b"\0")[:-1]:
        line, _, path = record.partition(b"\n")
        entries.append((os.fsdecode(path.rsplit(b"/", 1)[-1]), parse_stat_line(line)))
    return entries


def _split_ns(time_ns: int | None) -> tuple[str, str]:
    """Return (seconds, nine-digit nanoseconds) as text; ("", "") for None."""
    if time_ns is None:
        return "", ""
    seconds, nanoseconds = divmod(time_ns, 1_000_000_000)
    if seconds < 0:
        # "@-2.5" would mean -2.5 s to GNU touch, not -2 s + 0.5 s.
        return str(seconds), "0"
    return str(seconds), f"{nanoseconds:09d}"


class ShellBackend(Backend):
    """A backend that runs one shell command in the sandbox per operation.

    `run` executes an argv in the sandbox and returns (exit status, stdout,
    stderr); it raises `BackendError` with code `unavailable` when the sandbox
    is gone. Call `start` once before any operation.
    """

    # One call costs a process start in the sandbox (tens of milliseconds
    # with `docker exec`), so transfers use large chunks.
    max_chunk = 4 << 20
    read_ahead = 4 << 20

    def __init__(
        self,
        run: Runner,
        root: str = "/",
        timeout: float = 60.0,
        max_concurrent_calls: int = 8,
    ) -> None:
        self._run = run
        self.root = root
        self.timeout = timeout
        self._limiter = trio.CapacityLimiter(max_concurrent_calls)
        self._closed = False

    async def start(self) -> None:
        """Check that `root` is a directory and read the sandbox user's ids.

        Raises `ConnectError` when the sandbox has no `sh`, when `root` is
        missing or not a directory, or when `id` prints no ids.
        """
        try:
            output = await self._call(_IDENTITY, self.root, path=self.root)
        except BackendError as exc:
            raise ConnectError(self._connect_message(exc)) from exc

        ids = output.split()
        if len(ids) != 2 or not all(value.isdigit() for value in ids):
            raise ConnectError(
                f"`id -u; id -g` printed {output!r} in the sandbox, not two numbers"
            )
        self.identity = Identity(int(ids[0]), int(ids[1]))

    def _connect_message(self, exc: BackendError) -> str:
        if exc.code == "file_not_found":
            return f"root directory {self.root!r} not found in the sandbox"
        if exc.code == "not_a_directory":
            return f"root {self.root!r} is not a directory in the sandbox"
        if exc.code == "permission_denied":
            return f"root directory {self.root!r} is not accessible to the sandbox user"
        return f"cannot run the shell in the sandbox: {exc}"

    async def aclose(self) -> None:
        self._closed = True

    async def _call(
        self, script: str, *args: str, path: str, stdin: bytes | None = None, also: tuple[str, ...] = ()
    ) -> bytes:
        """Run `script` with `args` as $1...; return stdout or raise BackendError.

        `path` and the paths in `also` are checked first for a symlink below
        the root (see `nolinks`); `path` also labels the errors.
        """
        if self._closed:
            raise BackendError("unavailable", path, "the backend is closed")

        checked = (path, *also)
        guard = 'R=${1%/}; shift\n' + 'nolinks "$1"; shift\n' * len(checked)
        argv = ["sh", "-c", _PRELUDE + guard + script, "sh"]
        argv.extend(encode_argument(arg) for arg in (self.root, *checked, *args))
        with trio.move_on_after(self.timeout) as scope:
            async with self._limiter:
                try:
                    status, stdout, stderr = await self._run(argv, stdin)
                except BackendError as exc:
                    raise BackendError(exc.code, path, exc.message) from exc
        if scope.cancelled_caught:
            raise BackendError("timed_out", path, f"no reply in {self.timeout} s")

        if status != 0:
            raise self._error(status, stderr, path)
        return stdout

    def _error(self, status: int, stderr: bytes, path: str) -> BackendError:
        message = stderr.decode("utf-8", "replace").strip()
        code = _CODE_BY_EXIT.get(status) or code_for_stderr(stderr)
        if code is None and status in (126, 127):
            # The shell or a tool the script needs is missing.
            code = "not_supported"
        if code is None:
            code = "io_error"
            logger.debug("exit status %d, stderr %r", status, message)
        return BackendError(code, path, message)

    async def _call_stat(self, script: str, *args: str, path: str, also: tuple[str, ...] = ()) -> Stat:
        output = await self._call(script, *args, path=path, also=also)
        return parse_stat_line(output.strip())

    # Metadata.

    async def stat(self, path: str, follow: bool = False) -> Stat:
        return await self._call_stat(_STAT, path, "-L" if follow else "", path=path)

    async def open_check(self, path: str, writable: bool) -> Stat:
        return await self._call_stat(_OPEN_CHECK, path, "w" if writable else "r", path=path)

    async def list_dir(self, path: str) -> list[tuple[str, Stat]]:
        output = await self._call(_LIST_DIR, path, path=path)
        return _parse_list_dir(output)

    async def statfs(self, path: str) -> StatFs:
        output = await self._call(_STATFS, path, path=path)
        fields = [int(field) for field in output.split()]
        bsize, frsize, blocks, bfree, bavail, files, ffree, namemax = fields
        return StatFs(
            bsize=bsize,
            frsize=frsize,
            blocks=blocks,
            bfree=bfree,
            bavail=bavail,
            files=files,
            ffree=ffree,
            favail=ffree,  # stat -f prints no separate count for non-root users
            namemax=namemax,
        )

    async def readlink(self, path: str) -> str:
        output = await self._call(_READLINK, path, path=path)
        # readlink appends exactly one newline; a target may end in newlines.
        return os.fsdecode(output[:-1] if output.endswith(b"\n") else output)

    # Data.

    async def read(self, path: str, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        return await self._call(_READ, path, str(offset), str(size), path=path)

    async def write(self, path: str, offset: int, data: bytes) -> None:
        if not data:
            return
        await self._call(_WRITE, path, str(offset), path=path, stdin=data)

    async def truncate(self, path: str, size: int) -> None:
        await self._call(_TRUNCATE, path, str(size), path=path)

    async def fsync(self, path: str) -> None:
        await self._call(_FSYNC, path, path=path)

    # Namespace.

    async def create(self, path: str, mode: int, exclusive: bool = True) -> Stat:
        return await self._call_stat(
            _CREATE, path, _octal(mode), "1" if exclusive else "0", path=path
        )

    async def mkdir(self, path: str, mode: int) -> Stat:
        return await self._call_stat(_MKDIR, path, _octal(mode), path=path)

    async def mknod(self, path: str, mode: int, rdev: int) -> Stat:
        kind = stat_module.S_IFMT(mode)
        if kind == stat_module.S_IFREG:
            return await self.create(path, mode, exclusive=True)
        if kind == stat_module.S_IFIFO:
            return await self._call_stat(_MKFIFO, path, _octal(mode), path=path)
        if kind in (stat_module.S_IFCHR, stat_module.S_IFBLK):
            device_type = "c" if kind == stat_module.S_IFCHR else "b"
            major = str(os.major(rdev))
            minor = str(os.minor(rdev))
            return await self._call_stat(
                _MKNOD_DEVICE, path, _octal(mode), device_type, major, minor, path=path
            )
        # No shell tool creates a socket node, and other types are invalid.
        code = "not_supported" if kind == stat_module.S_IFSOCK else "invalid_argument"
        raise BackendError(code, path, f"cannot create file type {kind:o} with a shell")

    async def unlink(self, path: str) -> None:
        await self._call(_UNLINK, path, path=path)

    async def rmdir(self, path: str) -> None:
        await self._call(_RMDIR, path, path=path)

    async def rename(self, old: str, new: str, noreplace: bool = False) -> None:
        await self._call(_RENAME, old, new, "1" if noreplace else "0", path=old, also=(new,))

    async def symlink(self, target: str, path: str) -> Stat:
        return await self._call_stat(_SYMLINK, target, path, path=path)

    async def link(self, existing: str, new: str) -> Stat:
        return await self._call_stat(_LINK, existing, new, path=new, also=(existing,))

    # Attributes.

    async def chmod(self, path: str, mode: int) -> None:
        await self._call(_CHMOD, path, _octal(mode), path=path)

    async def chown(self, path: str, uid: int | None, gid: int | None) -> None:
        if uid is None and gid is None:
            # chown(2) with -1, -1 changes nothing but still resolves the path.
            await self.stat(path)
            return
        owner = "" if uid is None else str(uid)
        if gid is not None:
            owner += f":{gid}"
        await self._call(_CHOWN, path, owner, path=path)

    async def utimens(
        self, path: str, atime_ns: int | None, mtime_ns: int | None
    ) -> None:
        if atime_ns is None and mtime_ns is None:
            await self.stat(path)
            return
        await self._call(
            _UTIMENS, path, *_split_ns(atime_ns), *_split_ns(mtime_ns), path=path
        )


def _octal(mode: int) -> str:
    # Five digits: GNU chmod keeps a directory's set-id bits for a shorter
    # numeric mode unless the leading digit is given explicitly.
    return f"{mode & 0o7777:05o}"
