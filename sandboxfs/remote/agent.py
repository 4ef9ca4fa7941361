"""The sandboxfs agent: a file-operation server that runs inside a sandbox.

The host starts it as ``python3 -c BOOTSTRAP`` (see ``sandboxfs.remote``) and
sends this source on stdin. The agent then reads requests from the same
stdin and writes replies to stdout until stdin reaches end of file. stderr carries
diagnostics only. The same program serves the ``local`` backend as a host
subprocess.

This file must run on any Python 3.6 or newer with the standard library
alone, because sandboxes bring their own interpreter: no imports from
sandboxfs and no syntax newer than 3.6.

Wire format
-----------

Both directions carry frames. A frame is a 13-byte prefix, a JSON message
and a binary payload::

    prefix  = struct ">IBII": request id, flags, message length, payload length
    message = JSON text, ASCII only (ensure_ascii)
    payload = raw bytes (file data), never encoded

A request message is ``{"op": NAME, "args": {...}}``. A reply carries the id
of its request and is ``{"ok": {...}}`` or ``{"error": {...}}``. Replies may
come in any order, and the host may send many requests before it reads any
reply. A reply with ``FLAG_MORE`` set is one part of a longer reply: the host
concatenates the payloads of all parts and the ``items`` lists of their
``ok`` messages, and the part without the flag ends the reply. ``list_dir``
and ``read_file`` reply in parts, so that no frame grows past the limits
``MAX_MESSAGE`` and ``MAX_PAYLOAD``. The agent rejects a request over the
limits with an error reply and skips its bytes.

An error message contains ``message`` (the strerror text or a description)
and one of two keys. ``errno`` is the symbolic name of an OS errno, such as
``"ENOENT"``, which the host maps to its own number. ``code`` is a sandboxfs
error code, such as ``invalid_path`` or ``invalid_argument``.

Paths and names travel as JSON strings. A name that is not valid UTF-8 is
decoded with the surrogateescape error handler, so byte 0xff becomes
U+DCFF, which ``json`` writes as the escape ``\\udcff`` and reads back
unchanged. The agent encodes each path with UTF-8 and surrogateescape itself
and calls the OS with bytes, so the sandbox's locale does not matter.
A stat result is a list of twelve integers in the order of ``STAT_FIELDS``.

Caveats: the agent answers one request at a time in one thread, so a slow
filesystem call delays the replies queued behind it. Reads and writes open
and close the file on each request; no descriptors are cached.
"""

import errno
import json
import os
import signal
import stat
import struct
import sys
import traceback

PROTOCOL_VERSION = 1

PREFIX = struct.Struct(">IBII")
FLAG_MORE = 1

# Limits for one frame. File data moves in chunks of at most MAX_CHUNK bytes;
# MAX_PAYLOAD leaves room for a host that sends larger writes.
MAX_MESSAGE = 8 << 20
MAX_PAYLOAD = 16 << 20
MAX_CHUNK = 1 << 20

# Entries per part of a list_dir reply. A name is at most 255 bytes, which
# escape to at most 1530 JSON characters, so 2000 entries stay under
# MAX_MESSAGE with room to spare.
LIST_DIR_BATCH = 2000

# Replies are collected and written together while more requests are already
# buffered; this bounds how much is collected before a write.
OUTPUT_FLUSH_BYTES = 1 << 20

STAT_FIELDS = (
    "mode",
    "size",
    "uid",
    "gid",
    "nlink",
    "ino",
    "rdev",
    "atime_ns",
    "mtime_ns",
    "ctime_ns",
    "blocks",
    "blksize",
)

AT_FDCWD = -100
RENAME_NOREPLACE = 1

# renameat2 syscall numbers, used where the C library has no renameat2
# wrapper (glibc before 2.28, musl before 1.2.5). From the kernel's syscall
# tables; an architecture missing here falls back to a check-then-rename.
RENAMEAT2_SYSCALL = {
    "x86_64": 316,
    "aarch64": 276,
    "riscv64": 276,
    "ppc64le": 357,
    "s390x": 347,
}


class RequestError(Exception):
    """A request the agent rejects before any OS call, with a sandboxfs code."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code
        self.message = message


# Argument checks. Each returns the value or raises RequestError.


# The mount's root, as bytes, once hello has named it. Below the root a path
# never passes through a symlink: the kernel resolves symlinks itself and
# sends the names of real directories. A symlink there means the sandbox
# replaced a directory that the kernel still has cached, and following it
# could lead out of the root, so the request fails with ENOTDIR instead.
# The check runs before the operation, so a sandbox that swaps the directory
# in between is not stopped. The operation still runs as the sandbox user,
# with no access the sandbox does not already have.
ROOT = [None]


def check_no_symlink_below_root(path):
    root = ROOT[0]
    if root is None:
        return
    if root == b"/":
        current, rest = b"", path[1:]
    elif path.startswith(root + b"/"):
        current, rest = root, path[len(root) + 1 :]
    else:
        return
    # A trailing slash names the last component, not a directory below it.
    for part in rest.rstrip(b"/").split(b"/")[:-1]:
        current += b"/" + part
        try:
            is_link = stat.S_ISLNK(os.lstat(current).st_mode)
        except OSError:
            return  # the operation itself reports a missing or closed directory
        if is_link:
            name = current.decode("utf-8", "surrogateescape")
            raise RequestError("not_a_directory", "%r is a symlink, not a directory" % name)


def arg_path(args, name="path"):
    value = args.get(name)
    if not isinstance(value, str):
        raise RequestError("invalid_argument", "%s must be a string" % name)
    try:
        encoded = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise RequestError("invalid_path", "%s is not encodable: %r" % (name, value))
    if not encoded.startswith(b"/"):
        raise RequestError("invalid_path", "%s must be absolute: %r" % (name, value))
    if b"\0" in encoded:
        raise RequestError("invalid_path", "%s contains a NUL byte: %r" % (name, value))
    check_no_symlink_below_root(encoded)
    return encoded


def arg_bytes(args, name):
    """Return a string argument that need not be a path (a symlink target)."""
    value = args.get(name)
    if not isinstance(value, str):
        raise RequestError("invalid_argument", "%s must be a string" % name)
    try:
        encoded = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise RequestError("invalid_path", "%s is not encodable: %r" % (name, value))
    if b"\0" in encoded:
        raise RequestError("invalid_path", "%s contains a NUL byte: %r" % (name, value))
    return encoded


def arg_int(args, name, minimum=None, maximum=None):
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError("invalid_argument", "%s must be an integer" % name)
    if minimum is not None and value < minimum:
        raise RequestError("invalid_argument", "%s must be >= %d" % (name, minimum))
    if maximum is not None and value > maximum:
        raise RequestError("invalid_argument", "%s must be <= %d" % (name, maximum))
    return value


def arg_optional_int(args, name, minimum=None):
    if args.get(name) is None:
        return None
    return arg_int(args, name, minimum)


def arg_bool(args, name, default=False):
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise RequestError("invalid_argument", "%s must be true or false" % name)
    return value


def decode_name(name):
    return name.decode("utf-8", "surrogateescape")


def stat_list(st):
    return [
        st.st_mode,
        st.st_size,
        st.st_uid,
        st.st_gid,
        st.st_nlink,
        st.st_ino,
        st.st_rdev,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_blocks,
        st.st_blksize,
    ]


def lstat_reply(path):
    return {"stat": stat_list(os.lstat(path))}, b""


# File data helpers.


def open_regular(path, flags, mode=0o666):
    """Open `path` and fail unless it is a regular file.

    O_NONBLOCK keeps a FIFO from blocking the whole agent at open time; it
    does not change reads and writes of regular files.
    """
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def pread_all(fd, size, offset):
    chunks = []
    done = 0
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def pwrite_all(fd, data, offset):
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


# Handlers, one per operation. Each takes (args, payload) and returns
# (result, payload); the streaming ones are generators of such pairs.


def op_hello(args, payload):
    if "root" in args:
        ROOT[0] = None
        root = arg_path(args, "root").rstrip(b"/") or b"/"
        ROOT[0] = root
    result = {
        "protocol": PROTOCOL_VERSION,
        "uid": os.geteuid(),
        "gid": os.getegid(),
        "pid": os.getpid(),
        "python": "%d.%d.%d" % sys.version_info[:3],
        "max_message": MAX_MESSAGE,
        "max_payload": MAX_PAYLOAD,
    }
    return result, b""


def op_stat(args, payload):
    path = arg_path(args)
    follow = arg_bool(args, "follow")
    return {"stat": stat_list(os.stat(path, follow_symlinks=follow))}, b""


def op_open_check(args, payload):
    path = arg_path(args)
    flags = os.O_WRONLY if arg_bool(args, "writable") else os.O_RDONLY
    fd = open_regular(path, flags)
    try:
        return {"stat": stat_list(os.fstat(fd))}, b""
    finally:
        os.close(fd)


def op_list_dir(args, payload):
    path = arg_path(args)
    items = []
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the directory was read
            items.append([decode_name(entry.name), stat_list(st)])
            if len(items) >= LIST_DIR_BATCH:
                yield {"items": items}, b""
                items = []
    yield {"items": items}, b""


def op_statfs(args, payload):
    st = os.statvfs(arg_path(args))
    result = {
        "bsize": st.f_bsize,
        "frsize": st.f_frsize,
        "blocks": st.f_blocks,
        "bfree": st.f_bfree,
        "bavail": st.f_bavail,
        "files": st.f_files,
        "ffree": st.f_ffree,
        "favail": st.f_favail,
        "namemax": st.f_namemax,
    }
    return result, b""


def op_readlink(args, payload):
    return {"target": decode_name(os.readlink(arg_path(args)))}, b""


def op_read(args, payload):
    path = arg_path(args)
    offset = arg_int(args, "offset", minimum=0)
    size = arg_int(args, "size", minimum=0, maximum=MAX_PAYLOAD)
    fd = open_regular(path, os.O_RDONLY)
    try:
        data = pread_all(fd, size, offset)
    finally:
        os.close(fd)
    return {}, data


def op_read_file(args, payload):
    fd = open_regular(arg_path(args), os.O_RDONLY)
    try:
        offset = 0
        while True:
            chunk = pread_all(fd, MAX_CHUNK, offset)
            if not chunk:
                break
            offset += len(chunk)
            yield {}, chunk
    finally:
        os.close(fd)
    yield {}, b""


def op_write(args, payload):
    path = arg_path(args)
    offset = arg_int(args, "offset", minimum=0)
    fd = open_regular(path, os.O_WRONLY)
    try:
        pwrite_all(fd, payload, offset)
    finally:
        os.close(fd)
    return {}, b""


def op_write_file(args, payload):
    """Create or truncate a file and write the payload at offset 0."""
    path = arg_path(args)
    mode = arg_int(args, "mode", minimum=0, maximum=0o7777)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = open_regular(path, flags, mode)
    try:
        pwrite_all(fd, payload, 0)
    finally:
        os.close(fd)
    return {}, b""


def op_truncate(args, payload):
    os.truncate(arg_path(args), arg_int(args, "size", minimum=0))
    return {}, b""


def op_fsync(args, payload):
    fd = os.open(arg_path(args), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {}, b""


def op_create(args, payload):
    path = arg_path(args)
    mode = arg_int(args, "mode", minimum=0, maximum=0o7777)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    if arg_bool(args, "exclusive", True):
        flags |= os.O_EXCL
    os.close(os.open(path, flags, mode))
    return lstat_reply(path)


def op_mkdir(args, payload):
    path = arg_path(args)
    os.mkdir(path, arg_int(args, "mode", minimum=0, maximum=0o7777))
    return lstat_reply(path)


def op_mknod(args, payload):
    path = arg_path(args)
    os.mknod(path, arg_int(args, "mode", minimum=0), arg_int(args, "rdev", minimum=0))
    return lstat_reply(path)


def op_unlink(args, payload):
    os.unlink(arg_path(args))
    return {}, b""


def op_rmdir(args, payload):
    os.rmdir(arg_path(args))
    return {}, b""


def op_rename(args, payload):
    old = arg_path(args, "old")
    new = arg_path(args, "new")
    if arg_bool(args, "noreplace"):
        rename_noreplace(old, new)
    else:
        os.rename(old, new)
    return {}, b""


def op_symlink(args, payload):
    target = arg_bytes(args, "target")
    path = arg_path(args)
    os.symlink(target, path)
    return lstat_reply(path)


def op_link(args, payload):
    new = arg_path(args, "new")
    os.link(arg_path(args, "existing"), new, follow_symlinks=False)
    return lstat_reply(new)


def op_chmod(args, payload):
    os.chmod(arg_path(args), arg_int(args, "mode", minimum=0, maximum=0o7777))
    return {}, b""


def op_chown(args, payload):
    path = arg_path(args)
    uid = arg_optional_int(args, "uid", minimum=0)
    gid = arg_optional_int(args, "gid", minimum=0)
    uid = -1 if uid is None else uid
    gid = -1 if gid is None else gid
    os.chown(path, uid, gid, follow_symlinks=False)
    return {}, b""


def op_utimens(args, payload):
    path = arg_path(args)
    atime_ns = arg_optional_int(args, "atime_ns")
    mtime_ns = arg_optional_int(args, "mtime_ns")
    if atime_ns is None or mtime_ns is None:
        # NOTE: os.utime has no UTIME_OMIT, so a missing time is read back
        # with lstat and written again. A change to that time between the
        # two calls is lost.
        st = os.lstat(path)
        if atime_ns is None:
            atime_ns = st.st_atime_ns
        if mtime_ns is None:
            mtime_ns = st.st_mtime_ns
    os.utime(path, ns=(atime_ns, mtime_ns), follow_symlinks=False)
    return {}, b""


HANDLERS = {
    "hello": op_hello,
    "stat": op_stat,
    "open_check": op_open_check,
    "list_dir": op_list_dir,
    "statfs": op_statfs,
    "readlink": op_readlink,
    "read": op_read,
    "read_file": op_read_file,
    "write": op_write,
    "write_file": op_write_file,
    "truncate": op_truncate,
    "fsync": op_fsync,
    "create": op_create,
    "mkdir": op_mkdir,
    "mknod": op_mknod,
    "unlink": op_unlink,
    "rmdir": op_rmdir,
    "rename": op_rename,
    "symlink": op_symlink,
    "link": op_link,
    "chmod": op_chmod,
    "chown": op_chown,
    "utimens": op_utimens,
}

STREAMING = frozenset(["list_dir", "read_file"])


# rename with RENAME_NOREPLACE.

_renameat2 = None
_renameat2_loaded = False


def load_renameat2(use_wrapper=True):
    """Return a function (old, new) -> (result, errno) for renameat2, or None.

    With `use_wrapper` false, skip the C library's wrapper and use syscall(2).
    """
    try:
        import ctypes
    except ImportError:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    function = getattr(libc, "renameat2", None) if use_wrapper else None
    if function is not None:
        function.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
        function.restype = ctypes.c_int

        def call(old, new):
            result = function(AT_FDCWD, old, AT_FDCWD, new, RENAME_NOREPLACE)
            return result, ctypes.get_errno()

        return call

    number = RENAMEAT2_SYSCALL.get(os.uname().machine)
    syscall = getattr(libc, "syscall", None)
    if number is None or syscall is None:
        return None
    syscall.restype = ctypes.c_long

    def call_syscall(old, new):
        result = syscall(
            ctypes.c_long(number),
            ctypes.c_long(AT_FDCWD),
            ctypes.c_char_p(old),
            ctypes.c_long(AT_FDCWD),
            ctypes.c_char_p(new),
            ctypes.c_long(RENAME_NOREPLACE),
        )
        return result, ctypes.get_errno()

    return call_syscall


def rename_noreplace(old, new):
    global _renameat2, _renameat2_loaded
    if not _renameat2_loaded:
        _renameat2 = load_renameat2()
        _renameat2_loaded = True

    if _renameat2 is not None:
        result, number = _renameat2(old, new)
        if result == 0:
            return
        # ENOSYS: the kernel lacks renameat2. EINVAL: the filesystem lacks
        # RENAME_NOREPLACE, or the rename itself is invalid, which the plain
        # rename below reports again.
        if number not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(number, os.strerror(number))

    # NOTE: without renameat2 the check and the rename are two steps, so a
    # file created at `new` between them is replaced.
    if os.path.lexists(new):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
    os.rename(old, new)


# Framing and the serve loop.


class FrameReader:
    """Reads frames from a file descriptor with os.read, keeping a buffer."""

    def __init__(self, fd):
        self.fd = fd
        self.buffer = bytearray()

    def fill(self, size):
        """Buffer at least `size` bytes; return False on end of file."""
        while len(self.buffer) < size:
            chunk = os.read(self.fd, max(size - len(self.buffer), 1 << 16))
            if not chunk:
                return False
            self.buffer += chunk
        return True

    def take(self, size):
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def skip(self, size):
        """Discard `size` bytes without buffering them all."""
        dropped = min(size, len(self.buffer))
        del self.buffer[:dropped]
        size -= dropped
        while size > 0:
            chunk = os.read(self.fd, min(size, 1 << 20))
            if not chunk:
                return False
            size -= len(chunk)
        return True

    def has_frame(self):
        """Tell whether a whole frame is buffered, so reading will not block."""
        if len(self.buffer) < PREFIX.size:
            return False
        _, _, message_size, payload_size = PREFIX.unpack_from(self.buffer)
        return len(self.buffer) >= PREFIX.size + message_size + payload_size

    def next_frame(self):
        """Return (id, message bytes or None if oversized, payload), or None at EOF."""
        if not self.fill(PREFIX.size):
            return None
        request_id, _, message_size, payload_size = PREFIX.unpack_from(self.buffer)
        del self.buffer[: PREFIX.size]
        if message_size > MAX_MESSAGE or payload_size > MAX_PAYLOAD:
            if not self.skip(message_size + payload_size):
                return None
            return request_id, None, b""
        if not self.fill(message_size + payload_size):
            return None
        message = self.take(message_size)
        payload = self.take(payload_size)
        return request_id, message, payload


class ChannelClosed(Exception):
    """The host end of stdout is gone; the agent can only stop."""


class FrameWriter:
    """Collects reply frames and writes them with os.write."""

    def __init__(self, fd):
        self.fd = fd
        self.pending = []
        self.pending_size = 0

    def add(self, request_id, flags, message, payload):
        encoded = json.dumps(message, separators=(",", ":")).encode("ascii")
        prefix = PREFIX.pack(request_id, flags, len(encoded), len(payload))
        self.pending.append(prefix + encoded)
        if payload:
            self.pending.append(payload)
        self.pending_size += len(prefix) + len(encoded) + len(payload)
        if self.pending_size >= OUTPUT_FLUSH_BYTES:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        data = memoryview(b"".join(self.pending))
        self.pending = []
        self.pending_size = 0
        while data:
            try:
                written = os.write(self.fd, data)
            except OSError as exc:
                raise ChannelClosed(str(exc))
            data = data[written:]


def error_message(exc):
    """Return the error message of a reply for an exception."""
    if isinstance(exc, RequestError):
        return {"code": exc.code, "message": exc.message}
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, "EIO")
        return {"errno": name, "message": exc.strerror or os.strerror(exc.errno)}
    traceback.print_exc(file=sys.stderr)
    return {"code": "io_error", "message": "%s: %s" % (type(exc).__name__, exc)}


def parse_request(message):
    """Return (handler, op, args) for a request message or raise RequestError."""
    if message is None:
        raise RequestError("invalid_argument", "frame exceeds the size limits")
    try:
        request = json.loads(message.decode("ascii"))
    except ValueError as exc:
        raise RequestError("invalid_argument", "malformed request: %s" % exc)
    if not isinstance(request, dict):
        raise RequestError("invalid_argument", "request must be a JSON object")
    op = request.get("op")
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise RequestError("invalid_argument", "args must be a JSON object")
    handler = HANDLERS.get(op) if isinstance(op, str) else None
    if handler is None:
        raise RequestError("invalid_argument", "unknown operation %r" % (op,))
    return handler, op, args


def handle(writer, request_id, message, payload):
    """Run one request and add its reply frames to `writer`."""
    try:
        handler, op, args = parse_request(message)
        if op in STREAMING:
            previous = None
            for part in handler(args, payload):
                if previous is not None:
                    writer.add(request_id, FLAG_MORE, {"ok": previous[0]}, previous[1])
                previous = part
            result, data = previous
        else:
            result, data = handler(args, payload)
    except ChannelClosed:
        raise
    except Exception as exc:
        writer.add(request_id, 0, {"error": error_message(exc)}, b"")
        return
    writer.add(request_id, 0, {"ok": result}, data)


def serve(in_fd, out_fd):
    reader = FrameReader(in_fd)
    writer = FrameWriter(out_fd)
    while True:
        if not reader.has_frame():
            writer.flush()
        frame = reader.next_frame()
        if frame is None:
            writer.flush()
            return
        request_id, message, payload = frame
        handle(writer, request_id, message, payload)


def main():
    # Keep private copies of the channel's descriptors and point fds 0 and 1
    # elsewhere, so that a stray print or child process cannot corrupt it.
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    os.dup2(2, 1)

    # Modes arrive with the caller's umask already applied.
    os.umask(0)
    # Ctrl-C in the host's terminal reaches the local agent too; the agent
    # stops when the host closes its stdin instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    try:
        serve(in_fd, out_fd)
    except ChannelClosed:
        pass


if __name__ == "__main__":
    main()
