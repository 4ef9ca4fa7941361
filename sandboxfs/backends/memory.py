"""An in-memory sandbox: a test double of the Backend contract.

`MemoryBackend` keeps a POSIX-like tree in memory and implements every
method of `sandboxfs.backend.Backend`. It raises the error codes that the
agent reports for a Linux filesystem. Each error starts as the errno that
Linux gives and becomes a code through `code_for_errno`, as in the agent's
replies. So a rename of a directory into its own subtree fails with
`invalid_path` (EINVAL), which is what a real backend reports.

It ships in the package, as httpx ships `MockTransport`, so that the
filesystem core and code built on sandboxfs can be tested without a sandbox
or a mount. Every call is recorded in `calls`, and `fail` makes the next
calls of an operation fail with a chosen code.

Caveats:
- There are no permission checks: every operation runs with root's rights,
  so `permission_denied` and `read_only` only come from `fail`.
- Reads do not update the access time, as on a `noatime` mount.
- `statfs` reports fixed sizes; `fsync` only checks that the path exists.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import stat as stat_module
import time

import trio

from sandboxfs.backend import Backend, BackendError, Identity, Stat, StatFs, code_for_errno

NAME_MAX = 255
# Linux's PATH_MAX counts the terminating NUL byte.
PATH_MAX = 4096
# Linux's MAXSYMLINKS: resolving one path follows at most 40 symlinks.
MAX_SYMLINK_HOPS = 40
DIRECTORY_SIZE = 4096
BLOCK_SIZE = 4096


def _fail(number: int, path: str) -> BackendError:
    """Return the error the agent reports for OS errno `number` on `path`."""
    return BackendError(code_for_errno(number), path, os.strerror(number))


def _encode(path: str, label: str) -> bytes:
    """Return a path or name as the bytes the OS would get, as the agent checks it."""
    try:
        encoded = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise BackendError("invalid_path", label, "not encodable") from None
    if b"\0" in encoded:
        raise BackendError("invalid_path", label, "contains a NUL byte")
    return encoded


# Injected faults and the call record.


@dataclasses.dataclass(frozen=True)
class Call:
    """One recorded backend call: the method name and its arguments."""

    operation: str
    args: tuple


@dataclasses.dataclass
class _Fault:
    code: str
    times: int
    skip: int


class FaultPlan:
    """Errors to raise from the next calls of named operations."""

    def __init__(self) -> None:
        self._faults: dict[str, list[_Fault]] = {}

    def add(self, operation: str, code: str, times: int, after: int) -> None:
        self._faults.setdefault(operation, []).append(_Fault(code, times, after))

    def check(self, operation: str, path: str) -> None:
        """Raise the planned error for this call of `operation`, if there is one."""
        faults = self._faults.get(operation)
        if not faults:
            return
        fault = faults[0]
        if fault.skip > 0:
            fault.skip -= 1
            return
        fault.times -= 1
        if fault.times <= 0:
            faults.pop(0)
        raise BackendError(fault.code, path, "injected fault")


# The tree.


@dataclasses.dataclass(eq=False, kw_only=True)
class _Node:
    """One inode: the attributes every file type has."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int = 1
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    @property
    def size(self) -> int:
        return 0

    def stat(self) -> Stat:
        size = self.size
        return Stat(
            mode=self.mode,
            size=size,
            uid=self.uid,
            gid=self.gid,
            nlink=self.nlink,
            ino=self.ino,
            rdev=self.rdev,
            atime_ns=self.atime_ns,
            mtime_ns=self.mtime_ns,
            ctime_ns=self.ctime_ns,
            blocks=(size + BLOCK_SIZE - 1) // BLOCK_SIZE * (BLOCK_SIZE // 512),
            blksize=BLOCK_SIZE,
        )


@dataclasses.dataclass(eq=False, kw_only=True)
class _File(_Node):
    data: bytearray = dataclasses.field(default_factory=bytearray)

    @property
    def size(self) -> int:
        return len(self.data)


@dataclasses.dataclass(eq=False, kw_only=True)
class _Directory(_Node):
    nlink: int = 2
    # The directory that `..` leads to; the root is its own parent.
    parent: "_Directory | None" = None
    entries: dict[str, _Node] = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> int:
        return DIRECTORY_SIZE


@dataclasses.dataclass(eq=False, kw_only=True)
class _Symlink(_Node):
    target: str = ""

    @property
    def size(self) -> int:
        return len(_encode(self.target, self.target))


@dataclasses.dataclass(eq=False, kw_only=True)
class _Special(_Node):
    """A FIFO, socket or device node: a name and attributes, no data."""


@dataclasses.dataclass
class _Entry:
    """A resolved path: its directory, its last name and the node there, if any."""

    directory: _Directory
    name: str
    node: _Node | None
    # The path ended with "/", so it must name a directory.
    trailing_slash: bool


class _Clock:
    """Nanosecond wall-clock times that strictly increase from call to call."""

    def __init__(self) -> None:
        self._last = 0

    def now(self) -> int:
        self._last = max(time.time_ns(), self._last + 1)
        return self._last


class _Tree:
    """The inodes of one in-memory filesystem and path resolution over them."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self._next_ino = 1
        self.root = self.new(_Directory, stat_module.S_IFDIR | 0o755, Identity(0, 0))
        self.root.parent = self.root
        # The mount root's components: below it a path must not pass through
        # a symlink, as the agent checks.
        self.mount_root: list[str] = []

    def new(self, kind: type, mode: int, owner: Identity, **fields) -> _Node:
        now = self.clock.now()
        node = kind(
            ino=self._next_ino, mode=mode, uid=owner.uid, gid=owner.gid,
            atime_ns=now, mtime_ns=now, ctime_ns=now, **fields,
        )
        self._next_ino += 1
        return node

    def count(self) -> int:
        return self._next_ino - 1

    def resolve(self, path: str, follow: bool, follow_slash: bool = True) -> _Entry:
        """Walk `path` as the kernel does; follow a final symlink if `follow`.

        A trailing slash follows a final symlink too, unless `follow_slash` is
        false (as in unlink, rmdir, rename and the calls that make a name).
        Raises file_not_found or not_a_directory for a missing or non-directory
        component on the way, name_too_long and symlink_loop as Linux does.
        """
        if not path.startswith("/"):
            raise BackendError("invalid_path", path, "must be absolute")
        if len(_encode(path, path)) >= PATH_MAX:
            raise _fail(errno.ENAMETOOLONG, path)
        pending = _components(path)
        trailing_slash = path.endswith("/")
        directory = self.root
        hops = 0
        consumed = 0
        below_root = pending[::-1][: len(self.mount_root)] == self.mount_root
        if not pending:
            return _Entry(directory, "/", directory, trailing_slash)

        while True:
            name = pending.pop()
            last = not pending
            node = self._child(directory, name, path)
            consumed += 1
            if isinstance(node, _Symlink) and not last and hops == 0 and below_root and consumed > len(self.mount_root):
                raise _fail(errno.ENOTDIR, path)
            if isinstance(node, _Symlink) and (not last or follow or (trailing_slash and follow_slash)):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise _fail(errno.ELOOP, path)
                if node.target.startswith("/"):
                    directory = self.root
                pending.extend(_components(node.target))
                if last and node.target.endswith("/"):
                    trailing_slash = True
                if not pending:
                    return _Entry(self.root, "/", self.root, trailing_slash)
                continue
            if last:
                return _Entry(directory, name, node, trailing_slash)
            if node is None:
                raise _fail(errno.ENOENT, path)
            if not isinstance(node, _Directory):
                raise _fail(errno.ENOTDIR, path)
            directory = node

    def _child(self, directory: _Directory, name: str, path: str) -> _Node | None:
        if name == ".":
            return directory
        if name == "..":
            return directory.parent
        if len(_encode(name, path)) > NAME_MAX:
            raise _fail(errno.ENAMETOOLONG, path)
        return directory.entries.get(name)

    def existing(self, path: str, follow: bool) -> _Node:
        """Return the node at `path`; file_not_found if there is none."""
        entry = self.resolve(path, follow)
        if entry.node is None:
            raise _fail(errno.ENOENT, path)
        if entry.trailing_slash and not isinstance(entry.node, _Directory):
            raise _fail(errno.ENOTDIR, path)
        return entry.node

    def last_name(self, path: str) -> _Entry:
        """Resolve `path` without following its last name, whatever follows it."""
        return self.resolve(path, follow=False, follow_slash=False)

    def regular(self, path: str, writable: bool = False) -> _File:
        """Return the regular file that open(2) of `path` reaches, as the agent checks it."""
        node = self.existing(path, follow=True)
        if isinstance(node, _Directory):
            raise _fail(errno.EISDIR, path)
        if _opens_without_peer(node, writable):
            raise _fail(errno.ENXIO, path)
        if not isinstance(node, _File):
            raise _fail(errno.EINVAL, path)
        return node

    def insert(self, entry: _Entry, node: _Node) -> None:
        directory = entry.directory
        directory.entries[entry.name] = node
        if isinstance(node, _Directory):
            node.parent = directory
            directory.nlink += 1
        self.modified(directory)

    def remove(self, directory: _Directory, name: str) -> _Node:
        node = directory.entries.pop(name)
        if isinstance(node, _Directory):
            node.nlink = 0
            directory.nlink -= 1
        else:
            node.nlink -= 1
        self.changed(node)
        self.modified(directory)
        return node

    def modified(self, node: _Node) -> None:
        node.mtime_ns = node.ctime_ns = self.clock.now()

    def changed(self, node: _Node) -> None:
        node.ctime_ns = self.clock.now()


def _components(path: str) -> list[str]:
    """Return the names of a path, last name first, so `pop` yields them in order."""
    return [name for name in reversed(path.split("/")) if name]


def _opens_without_peer(node: _Node, writable: bool) -> bool:
    """Tell whether the agent's non-blocking open(2) fails with ENXIO.

    A socket never opens, and a FIFO opened for writing with O_NONBLOCK
    fails while no process has it open for reading, which is always the
    case here.
    """
    kind = stat_module.S_IFMT(node.mode)
    return kind == stat_module.S_IFSOCK or (kind == stat_module.S_IFIFO and writable)


def _is_inside(node: _Node, directory: _Directory) -> bool:
    """Tell whether `directory` is `node` or lies below it."""
    while True:
        if directory is node:
            return True
        if directory.parent is directory:
            return False
        directory = directory.parent


# The backend.


def _operation(label_index: int = 0):
    """Record each call of a backend method and apply the planned faults.

    Every call passes a trio checkpoint before it changes the tree, so other
    tasks can run between two calls, as they can with a real sandbox.
    `label_index` selects the argument that errors name.
    """

    def decorate(method):
        name = method.__name__

        @functools.wraps(method)
        async def run(self, *args, **kwargs):
            self.calls.append(Call(name, args + tuple(kwargs.values())))
            await trio.lowlevel.checkpoint()
            label = args[label_index] if len(args) > label_index else ""
            if self.closed:
                raise BackendError("unavailable", label, "the backend was closed")
            self.faults.check(name, label)
            return await method(self, *args, **kwargs)

        return run

    return decorate


class MemoryBackend(Backend):
    """A sandbox held in memory, for tests: see the module docstring.

    `root` is created as a directory owned by `identity`. New files are
    owned by `identity`, except that a set-group-ID directory gives its group.
    """

    def __init__(
        self,
        root: str = "/",
        identity: Identity = Identity(1000, 1000),
        max_chunk: int = 1 << 20,
    ) -> None:
        self.identity = identity
        self.max_chunk = max_chunk
        self.calls: list[Call] = []
        self.faults = FaultPlan()
        self.closed = False
        self._tree = _Tree(_Clock())
        self.root = "/" + root.strip("/") if root.strip("/") else "/"
        self._make_root(self.root)
        self._tree.mount_root = _components(self.root)[::-1]

    def _make_root(self, root: str) -> None:
        directory = self._tree.root
        for name in _components(root)[::-1]:
            child = self._tree.new(_Directory, stat_module.S_IFDIR | 0o755, self.identity)
            self._tree.insert(_Entry(directory, name, None, False), child)
            directory = child

    def fail(self, operation: str, code: str, times: int = 1, after: int = 0) -> None:
        """Make calls of `operation` fail with BackendError(`code`).

        The first `after` calls from now succeed, then the next `times` calls
        fail. `operation` is a method name such as "write" or "truncate".
        """
        self.faults.add(operation, code, times, after)

    def calls_to(self, operation: str) -> list[Call]:
        """Return the recorded calls of one operation, oldest first."""
        return [call for call in self.calls if call.operation == operation]

    async def aclose(self) -> None:
        self.closed = True

    # Metadata.

    @_operation()
    async def stat(self, path: str, follow: bool = False) -> Stat:
        return self._tree.existing(path, follow).stat()

    @_operation()
    async def list_dir(self, path: str) -> list[tuple[str, Stat]]:
        node = self._tree.existing(path, follow=True)
        if not isinstance(node, _Directory):
            raise _fail(errno.ENOTDIR, path)
        return [(name, child.stat()) for name, child in node.entries.items()]

    @_operation()
    async def statfs(self, path: str) -> StatFs:
        self._tree.existing(path, follow=True)
        total = 1 << 20
        used = self._tree.count()
        return StatFs(
            blocks=total, bfree=total // 2, bavail=total // 2,
            files=total, ffree=total - used, favail=total - used, namemax=NAME_MAX,
        )

    @_operation()
    async def readlink(self, path: str) -> str:
        node = self._tree.existing(path, follow=False)
        if not isinstance(node, _Symlink):
            raise _fail(errno.EINVAL, path)
        return node.target

    # Data.

    @_operation()
    async def open_check(self, path: str, writable: bool) -> Stat:
        return self._tree.regular(path, writable).stat()

    @_operation()
    async def read(self, path: str, offset: int, size: int) -> bytes:
        _check_not_negative(path, offset=offset, size=size)
        node = self._tree.regular(path)
        return bytes(node.data[offset : offset + size])

    @_operation()
    async def write(self, path: str, offset: int, data: bytes) -> None:
        _check_not_negative(path, offset=offset)
        node = self._tree.regular(path, writable=True)
        if not data:
            return
        if offset > len(node.data):
            node.data.extend(bytes(offset - len(node.data)))
        node.data[offset : offset + len(data)] = data
        self._tree.modified(node)

    @_operation()
    async def truncate(self, path: str, size: int) -> None:
        _check_not_negative(path, size=size)
        node = self._tree.regular(path)
        if size == len(node.data):
            return
        if size < len(node.data):
            del node.data[size:]
        else:
            node.data.extend(bytes(size - len(node.data)))
        self._tree.modified(node)

    @_operation()
    async def fsync(self, path: str) -> None:
        self._tree.existing(path, follow=True)

    # Namespace.

    @_operation()
    async def create(self, path: str, mode: int, exclusive: bool = True) -> Stat:
        _check_mode(path, mode)
        if path.endswith("/"):
            raise _fail(errno.EISDIR, path)
        entry = self._tree.resolve(path, follow=not exclusive)
        if entry.node is not None:
            return self._open_existing(path, entry.node, exclusive)
        self._insert_new(entry, _File, stat_module.S_IFREG | mode)
        return self._tree.existing(path, follow=False).stat()

    def _open_existing(self, path: str, node: _Node, exclusive: bool) -> Stat:
        if exclusive:
            raise _fail(errno.EEXIST, path)
        if isinstance(node, _Directory):
            raise _fail(errno.EISDIR, path)
        return self._tree.existing(path, follow=False).stat()

    @_operation()
    async def mkdir(self, path: str, mode: int) -> Stat:
        _check_mode(path, mode)
        entry = self._new_name(path, allow_trailing_slash=True)
        node = self._insert_new(entry, _Directory, stat_module.S_IFDIR | mode)
        return node.stat()

    @_operation()
    async def mknod(self, path: str, mode: int, rdev: int) -> Stat:
        _check_not_negative(path, mode=mode, rdev=rdev)
        kind = stat_module.S_IFMT(mode)
        if kind == stat_module.S_IFDIR:
            raise _fail(errno.EPERM, path)
        if kind not in (0, stat_module.S_IFREG, stat_module.S_IFIFO, stat_module.S_IFSOCK, stat_module.S_IFCHR, stat_module.S_IFBLK):
            raise _fail(errno.EINVAL, path)
        entry = self._new_name(path)
        if kind in (0, stat_module.S_IFREG):
            node = self._insert_new(entry, _File, stat_module.S_IFREG | stat_module.S_IMODE(mode))
        else:
            device = rdev if kind in (stat_module.S_IFCHR, stat_module.S_IFBLK) else 0
            node = self._insert_new(entry, _Special, kind | stat_module.S_IMODE(mode), rdev=device)
        return node.stat()

    @_operation(label_index=1)
    async def symlink(self, target: str, path: str) -> Stat:
        if len(_encode(target, path)) >= PATH_MAX:
            raise _fail(errno.ENAMETOOLONG, path)
        if not target:
            raise _fail(errno.ENOENT, path)
        entry = self._new_name(path)
        node = self._insert_new(entry, _Symlink, stat_module.S_IFLNK | 0o777, target=target)
        return node.stat()

    @_operation(label_index=1)
    async def link(self, existing: str, new: str) -> Stat:
        node = self._tree.existing(existing, follow=False)
        entry = self._new_name(new)
        if isinstance(node, _Directory):
            raise _fail(errno.EPERM, existing)
        node.nlink += 1
        self._tree.changed(node)
        self._tree.insert(entry, node)
        return node.stat()

    def _new_name(self, path: str, allow_trailing_slash: bool = False) -> _Entry:
        """Return where a new name goes; already_exists if the name is taken."""
        entry = self._tree.last_name(path)
        if entry.node is not None:
            raise _fail(errno.EEXIST, path)
        if entry.trailing_slash and not allow_trailing_slash:
            raise _fail(errno.ENOENT, path)
        return entry

    def _insert_new(self, entry: _Entry, kind: type, mode: int, **fields) -> _Node:
        owner = self.identity
        parent = entry.directory
        if parent.mode & stat_module.S_ISGID:
            # A set-group-ID directory gives new entries its group, and new
            # subdirectories its set-group-ID bit.
            owner = Identity(owner.uid, parent.gid)
            if kind is _Directory:
                mode |= stat_module.S_ISGID
        node = self._tree.new(kind, mode, owner, **fields)
        self._tree.insert(entry, node)
        return node

    @_operation()
    async def unlink(self, path: str) -> None:
        entry = self._tree.last_name(path)
        if entry.node is None:
            raise _fail(errno.ENOENT, path)
        if isinstance(entry.node, _Directory):
            raise _fail(errno.EISDIR, path)
        if entry.trailing_slash:
            raise _fail(errno.ENOTDIR, path)
        self._tree.remove(entry.directory, entry.name)

    @_operation()
    async def rmdir(self, path: str) -> None:
        entry = self._tree.last_name(path)
        _check_removable_name(entry, path)
        if entry.node is None:
            raise _fail(errno.ENOENT, path)
        if not isinstance(entry.node, _Directory):
            raise _fail(errno.ENOTDIR, path)
        if entry.node.entries:
            raise _fail(errno.ENOTEMPTY, path)
        self._tree.remove(entry.directory, entry.name)

    @_operation()
    async def rename(self, old: str, new: str, noreplace: bool = False) -> None:
        source = self._tree.last_name(old)
        destination = self._tree.last_name(new)
        for entry, path in ((source, old), (destination, new)):
            if entry.name in (".", "..", "/"):
                raise _fail(errno.EBUSY, path)
        if source.node is None:
            raise _fail(errno.ENOENT, old)
        if noreplace and destination.node is not None:
            raise _fail(errno.EEXIST, new)
        _check_rename(source, destination, old, new)
        if source.node is destination.node:
            return
        self._move(source, destination)

    def _move(self, source: _Entry, destination: _Entry) -> None:
        if destination.node is not None:
            self._tree.remove(destination.directory, destination.name)
        node = source.node
        del source.directory.entries[source.name]
        if isinstance(node, _Directory):
            source.directory.nlink -= 1
        self._tree.modified(source.directory)
        self._tree.insert(destination, node)
        self._tree.changed(node)

    # Attributes.

    @_operation()
    async def chmod(self, path: str, mode: int) -> None:
        _check_mode(path, mode)
        node = self._tree.existing(path, follow=True)
        node.mode = stat_module.S_IFMT(node.mode) | mode
        self._tree.changed(node)

    @_operation()
    async def chown(self, path: str, uid: int | None, gid: int | None) -> None:
        _check_not_negative(path, uid=uid or 0, gid=gid or 0)
        node = self._tree.existing(path, follow=False)
        if uid is not None:
            node.uid = uid
        if gid is not None:
            node.gid = gid
        if (uid is not None or gid is not None) and not isinstance(node, _Directory):
            _clear_set_id_bits(node)
        self._tree.changed(node)

    @_operation()
    async def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        node = self._tree.existing(path, follow=False)
        if atime_ns is not None:
            node.atime_ns = atime_ns
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
        self._tree.changed(node)


def _check_not_negative(path: str, **values: int) -> None:
    """Reject a negative number as the agent does, before any OS call."""
    for name, value in values.items():
        if value < 0:
            raise BackendError("invalid_argument", path, f"{name} must be >= 0")


def _check_mode(path: str, mode: int) -> None:
    """Reject a mode outside 0..0o7777, as the agent does."""
    if not 0 <= mode <= 0o7777:
        raise BackendError("invalid_argument", path, "mode must be between 0 and 0o7777")


def _check_removable_name(entry: _Entry, path: str) -> None:
    """Reject `.`, `..` and `/` as the last name of rmdir, as Linux does."""
    if entry.name == ".":
        raise _fail(errno.EINVAL, path)
    if entry.name == "..":
        raise _fail(errno.ENOTEMPTY, path)
    if entry.name == "/":
        raise _fail(errno.EBUSY, path)


def _check_rename(source: _Entry, destination: _Entry, old: str, new: str) -> None:
    """Apply rename(2)'s checks on the kinds of the two nodes, in Linux's order."""
    node, replaced = source.node, destination.node
    if not isinstance(node, _Directory) and (source.trailing_slash or destination.trailing_slash):
        raise _fail(errno.ENOTDIR, old)
    if isinstance(node, _Directory) and _is_inside(node, destination.directory):
        raise _fail(errno.EINVAL, old)
    if isinstance(replaced, _Directory) and _is_inside(replaced, source.directory):
        raise _fail(errno.ENOTEMPTY, new)
    if replaced is None or replaced is node:
        return
    if isinstance(node, _Directory) and not isinstance(replaced, _Directory):
        raise _fail(errno.ENOTDIR, new)
    if not isinstance(node, _Directory) and isinstance(replaced, _Directory):
        raise _fail(errno.EISDIR, new)
    if isinstance(replaced, _Directory) and replaced.entries:
        raise _fail(errno.ENOTEMPTY, new)


def _clear_set_id_bits(node: _Node) -> None:
    # Linux clears set-user-ID on chown of a non-directory, and set-group-ID
    # when the group may execute (without group execute it marks mandatory
    # locking, which chown keeps).
    node.mode &= ~stat_module.S_ISUID
    if node.mode & stat_module.S_IXGRP:
        node.mode &= ~stat_module.S_ISGID
