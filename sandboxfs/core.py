"""The filesystem core: inodes, open handles, caches, in terms of a Backend.

The core uses none of pyfuse3's types: `sandboxfs.fuse_ops` converts FUSE
requests into calls here and the results into replies. Errors leave the core
as `FsError` (a local check failed) or `BackendError` (the sandbox rejected
the request), and `sandboxfs.fuse_ops` turns both into errno values in one
place.

Caveats:
- One inode stands for one path, so two hard links to a file have two inode
  numbers through the mount (both show the link count).
- A file that is unlinked or replaced through the mount while open stays
  readable under a hidden hard link until its last handle is closed (see
  _keep_open_file). Where no link can be made, only its bytes staged locally
  stay readable, and other bytes give ENOENT.
- Open files are tracked by path: if a program in the sandbox renames another
  file over that path while the host has it open, the host's pending writes
  go to that other file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import secrets
import stat as stat_module

import trio

from .backend import Backend, BackendError, Stat, StatFs
from .inodes import InodeTable, Node
from .options import MountOptions
from .readahead import ReadAhead
from .staging import StagedFile
from .symlinks import contain_target

logger = logging.getLogger(__name__)

NAME_MAX = 255
# The directory and name prefix of the hidden links that keep open files
# readable after their own name is unlinked or replaced through the mount.
HIDDEN_DIR = ".sandboxfs-open"
HIDDEN_PREFIX = ".sandboxfs-open-"
# Seconds the removal of hidden names may take at exit.
HIDDEN_CLEANUP_TIMEOUT = 10.0


class FsError(Exception):
    """A request failed a local check; `errno` is the error to return."""

    def __init__(self, number: int, message: str = "") -> None:
        super().__init__(number, message or os.strerror(number))
        self.errno = number


@dataclasses.dataclass
class Handle:
    node: Node
    flags: int
    writable: bool
    # The sandbox file's size when opened, for a StagedFile made at first write.
    remote_size: int = 0
    # The backend's connection generation when opened: after the mount has
    # connected again, what the handle cached may no longer be the sandbox's.
    generation: int = 0
    readahead: ReadAhead = dataclasses.field(default_factory=ReadAhead)


@dataclasses.dataclass
class Changes:
    """The changes of one setattr request; None leaves a value as it is."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class FilesystemCore:
    """A sandbox's files, as inodes and open handles."""

    def __init__(self, backend: Backend, options: MountOptions) -> None:
        self.backend = backend
        self.options = options
        self.table = InodeTable(backend.root)
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, list[tuple[str, Stat]]] = {}
        self.dir_handles_nodes: dict[int, Node] = {}
        self._next_fh = 1
        self.local_uid = os.getuid()
        self.local_gid = os.getgid()
        os.makedirs(options.staging_dir, mode=0o700, exist_ok=True)

    # Helpers.

    def node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None:
            raise FsError(errno.ESTALE)
        return node

    def path(self, node: Node) -> str:
        if node.detached:
            raise FsError(errno.ENOENT)
        return self.table.path(node)

    def child_path(self, parent: Node, name: str) -> str:
        check_name(name)
        return _join(self.path(parent), name)

    def _now(self) -> float:
        return trio.current_time()

    def remember(self, node: Node, st: Stat) -> Stat:
        node.attr = st
        node.attr_expiry = self._now() + self.options.attr_timeout
        return self.display(node, st)

    def display(self, node: Node, st: Stat) -> Stat:
        """Return attributes as the mount shows them (id mapping, staged size)."""
        changes = {}
        staged = node.dirty
        if staged is not None:
            changes["size"] = staged.size
        if self.options.idmap == "user":
            identity = self.backend.identity
            if st.uid == identity.uid:
                changes["uid"] = self.local_uid
            if st.gid == identity.gid:
                changes["gid"] = self.local_gid
        return dataclasses.replace(st, **changes) if changes else st

    def _sandbox_ids(self, uid: int | None, gid: int | None) -> tuple[int | None, int | None]:
        if self.options.idmap == "user":
            if uid == self.local_uid:
                uid = self.backend.identity.uid
            if gid == self.local_gid:
                gid = self.backend.identity.gid
        return uid, gid

    def _forget_attr(self, node: Node) -> None:
        node.attr_expiry = 0.0

    def _new_entry(self, parent: Node, name: str, st: Stat) -> tuple[Node, Stat]:
        node = self.table.add(parent, name)
        node.lookups += 1
        return node, self.remember(node, st)

    # Names and attributes.

    async def lookup(self, parent_ino: int, name: str) -> tuple[Node, Stat]:
        """Return the node for a name, counting one lookup. ENOENT if absent."""
        parent = self.node(parent_ino)
        path = self.child_path(parent, name)
        st = await self.backend.stat(path)
        return self._new_entry(parent, name, st)

    async def getattr(self, ino: int) -> tuple[Node, Stat]:
        node = self.node(ino)
        fresh = node.attr_expiry > self._now()
        if node.attr is not None and (fresh or node.detached):
            # An unlinked file has no path to stat; its open handles see the
            # attributes it had, as fstat(2) on a local filesystem does.
            return node, self.display(node, node.attr)
        st = await self.backend.stat(node.hidden_path or self.path(node))
        return node, self.remember(node, st)

    async def setattr(self, ino: int, changes: Changes) -> tuple[Node, Stat]:
        node = self.node(ino)
        if node.detached:
            return node, self._setattr_detached(node, changes)
        path = self.path(node)
        staged = node.dirty

        if changes.size is not None:
            if staged is not None:
                staged.truncate(changes.size)
            else:
                await self.backend.truncate(path, changes.size)
                self._note_remote_size(node, changes.size)
        if changes.mode is not None:
            await self.backend.chmod(path, stat_module.S_IMODE(changes.mode))
        if changes.uid is not None or changes.gid is not None:
            uid, gid = self._sandbox_ids(changes.uid, changes.gid)
            await self.backend.chown(path, uid, gid)
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            # Pending writes would change the mtime after it was set (cp -p
            # sets times on the open file before closing it): send them first.
            if staged is not None and staged.needs_upload:
                await self._upload(node, staged)
            await self.backend.utimens(path, changes.atime_ns, changes.mtime_ns)

        st = await self.backend.stat(path)
        return node, self.remember(node, st)

    def _note_remote_size(self, node: Node, size: int) -> None:
        """Record a new size of the sandbox's file for the node's open handles.

        A later write through any of them starts its staged file from it.
        """
        for handle in self.handles.values():
            if handle.node is node:
                handle.remote_size = size
                handle.readahead.drop()

    def _setattr_detached(self, node: Node, changes: Changes) -> Stat:
        """Apply a setattr to a file whose name was unlinked, through an open handle.

        No name leads to the file in the sandbox any more, so the changes are
        kept in the cached attributes (and the staged size) for the handles
        that remain, as a local filesystem keeps them on the orphaned inode.
        """
        if node.attr is None:
            raise FsError(errno.ENOENT)
        replaced = {}
        if changes.size is not None:
            if node.dirty is None:
                node.dirty = StagedFile(self.options.staging_dir, node.attr.size)
            node.dirty.truncate(changes.size)
            replaced["size"] = changes.size
        if changes.mode is not None:
            replaced["mode"] = stat_module.S_IFMT(node.attr.mode) | stat_module.S_IMODE(changes.mode)
        uid, gid = self._sandbox_ids(changes.uid, changes.gid)
        if uid is not None:
            replaced["uid"] = uid
        if gid is not None:
            replaced["gid"] = gid
        if changes.atime_ns is not None:
            replaced["atime_ns"] = changes.atime_ns
        if changes.mtime_ns is not None:
            replaced["mtime_ns"] = changes.mtime_ns
        node.attr = dataclasses.replace(node.attr, **replaced)
        node.attr_expiry = float("inf")
        return self.display(node, node.attr)

    async def readlink(self, ino: int) -> str:
        node = self.node(ino)
        path = self.path(node)
        target = await self.backend.readlink(path)
        if self.options.symlinks == "raw":
            return target
        shown = contain_target(target, path, self.backend.root)
        if shown is None:
            logger.info("symlink %r -> %r leads outside the mount; readlink gives EPERM", path, target)
            raise FsError(errno.EPERM)
        return shown

    # Creating and removing names.

    async def mknod(self, parent_ino: int, name: str, mode: int, rdev: int) -> tuple[Node, Stat]:
        parent = self.node(parent_ino)
        st = await self.backend.mknod(self.child_path(parent, name), mode, rdev)
        return self._new_entry(parent, name, st)

    async def mkdir(self, parent_ino: int, name: str, mode: int) -> tuple[Node, Stat]:
        parent = self.node(parent_ino)
        st = await self.backend.mkdir(self.child_path(parent, name), stat_module.S_IMODE(mode))
        return self._new_entry(parent, name, st)

    async def symlink(self, parent_ino: int, name: str, target: str) -> tuple[Node, Stat]:
        parent = self.node(parent_ino)
        st = await self.backend.symlink(target, self.child_path(parent, name))
        return self._new_entry(parent, name, st)

    async def link(self, ino: int, parent_ino: int, name: str) -> tuple[Node, Stat]:
        node = self.node(ino)
        parent = self.node(parent_ino)
        st = await self.backend.link(self.path(node), self.child_path(parent, name))
        self._forget_attr(node)
        return self._new_entry(parent, name, st)

    async def unlink(self, parent_ino: int, name: str) -> None:
        parent = self.node(parent_ino)
        path = self.child_path(parent, name)
        node = self.table.child(parent, name)
        hidden = await self._keep_open_file(node, path)
        try:
            await self.backend.unlink(path)
        except BaseException:
            await self._remove_hidden(hidden)
            raise
        self.table.detach(parent, name)
        if hidden is not None:
            node.hidden_path = hidden

    async def rmdir(self, parent_ino: int, name: str) -> None:
        parent = self.node(parent_ino)
        await self.backend.rmdir(self.child_path(parent, name))
        self.table.detach(parent, name)

    async def rename(self, old_parent_ino: int, old_name: str, new_parent_ino: int, new_name: str, noreplace: bool) -> None:
        old_parent = self.node(old_parent_ino)
        new_parent = self.node(new_parent_ino)
        old_path = self.child_path(old_parent, old_name)
        new_path = self.child_path(new_parent, new_name)
        replaced = self.table.child(new_parent, new_name)
        hidden = None if noreplace else await self._keep_open_file(replaced, new_path)
        try:
            await self.backend.rename(old_path, new_path, noreplace=noreplace)
        except BaseException:
            await self._remove_hidden(hidden)
            raise
        self.table.move(old_parent, old_name, new_parent, new_name)
        if hidden is not None:
            replaced.hidden_path = hidden
        moved = self.table.child(new_parent, new_name)
        if moved is not None:
            # rename(2) changes the ctime.
            self._forget_attr(moved)

    async def _keep_open_file(self, node: Node | None, path: str) -> str | None:
        """Give an open file that is about to lose its name a hidden second name.

        Its open handles then go on reading it there, as they would on a local
        filesystem, until the last one is closed; NFS clients keep such files
        as .nfsXXXX. The hidden name is in HIDDEN_DIR at the mount root, so
        that the file's own directory can still be removed, or beside the
        file where the root is not writable. Returns the hidden path, or None
        when the file is not open or no hard link can be made. Without a hidden
        name, reads of bytes not staged on the host fail with ENOENT.
        """
        if node is None or node.open_count + node.opening == 0 or node.hidden_path is not None:
            return None
        name = f"{HIDDEN_PREFIX}{secrets.token_hex(8)}"
        hidden_dir = _join(self.backend.root, HIDDEN_DIR)
        try:
            await self.backend.mkdir(hidden_dir, 0o700)
        except BackendError as exc:
            if exc.code != "already_exists":
                logger.debug("cannot make %r: %s", hidden_dir, exc)
        for directory in (hidden_dir, path.rsplit("/", 1)[0] or "/"):
            hidden = _join(directory, name)
            try:
                await self.backend.link(path, hidden)
            except BackendError as exc:
                logger.debug("cannot link %r to %r: %s", path, hidden, exc)
                continue
            return hidden
        logger.info("could not keep open file %r under a hidden name; reads through its handles may fail", path)
        with contextlib.suppress(BackendError):
            await self.backend.rmdir(hidden_dir)
        return None

    async def _drop_hidden_if_unused(self, node: Node) -> None:
        """Remove the node's hidden name when no handle and no other open needs it."""
        if node.hidden_path is not None and node.open_count == 0 and node.opening == 0:
            hidden, node.hidden_path = node.hidden_path, None
            await self._remove_hidden(hidden)

    async def _remove_hidden(self, hidden: str | None) -> None:
        if hidden is None:
            return
        with trio.CancelScope(shield=True):
            try:
                await self.backend.unlink(hidden)
            except BackendError as exc:
                logger.warning("could not remove %r, which kept an open file readable: %s", hidden, exc)
                return
            hidden_dir = _join(self.backend.root, HIDDEN_DIR)
            if hidden.startswith(hidden_dir + "/"):
                try:
                    await self.backend.rmdir(hidden_dir)
                except BackendError:
                    pass  # another open file still has a hidden name there

    # Files.

    def _new_handle(self, handle: Handle) -> int:
        handle.generation = self.backend.generation
        handle.readahead.limit = self.backend.read_ahead
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        handle.node.open_count += 1
        return fh

    def handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle

    async def create(self, parent_ino: int, name: str, mode: int, flags: int) -> tuple[int, Node, Stat]:
        parent = self.node(parent_ino)
        st = await self.backend.create(self.child_path(parent, name), stat_module.S_IMODE(mode), exclusive=True)
        node, shown = self._new_entry(parent, name, st)
        node.cached_version = (st.size, st.mtime_ns)
        fh = self._new_handle(Handle(node, flags, writable=True, remote_size=0))
        return fh, node, shown

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open a file; return the handle and whether the page cache stays valid.

        Close-to-open consistency: the attributes are fetched again, and the
        kernel's cached pages are kept only if size and mtime did not change.
        """
        node = self.node(ino)
        if node.detached:
            # The kernel looked the name up before it was unlinked or replaced
            # through the mount. ESTALE makes it look the name up again and
            # retry, so the open reaches the file that has the name now.
            raise FsError(errno.ESTALE)
        path = self.path(node)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        truncate = writable and bool(flags & os.O_TRUNC)

        if node.dirty is not None:
            # Another handle has pending writes; the cached pages are ours.
            if truncate:
                node.dirty.truncate(0)
            return self._new_handle(Handle(node, flags, writable, node.dirty.remote_size)), True

        # While the sandbox checks the open, a rename or unlink through the
        # mount may take the name: it counts this open as an open handle.
        node.opening += 1
        try:
            if truncate:
                await self.backend.truncate(path, 0)
                self._note_remote_size(node, 0)
            st = await self.backend.open_check(path, writable)
        except BaseException:
            node.opening -= 1
            await self._drop_hidden_if_unused(node)
            raise
        node.opening -= 1
        if node.detached and node.hidden_path is None:
            await self._drop_hidden_if_unused(node)
            raise FsError(errno.ESTALE)
        if st.is_dir:
            await self._drop_hidden_if_unused(node)
            raise FsError(errno.EISDIR)
        self.remember(node, st)
        version = (st.size, st.mtime_ns)
        keep_cache = node.cached_version == version and not truncate
        node.cached_version = version
        return self._new_handle(Handle(node, flags, writable, st.size)), keep_cache

    def _staged(self, handle: Handle) -> StagedFile:
        node = handle.node
        if node.dirty is None:
            node.dirty = StagedFile(self.options.staging_dir, handle.remote_size)
        return node.dirty

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handle(fh)
        if handle.generation != self.backend.generation:
            # The sandbox was out of reach since this file was opened, and
            # the file may have changed meanwhile: EIO rather than old data.
            # Writes are still taken, and uploaded as any others.
            raise FsError(errno.EIO, "the file was opened before the mount connected again; open it again")
        node = handle.node
        staged = node.dirty
        if staged is not None:
            # The staged bytes stay readable after the name is unlinked; only
            # bytes that must come from the sandbox need the path.
            path = node.hidden_path or (self.table.path(node) if node.detached else self.path(node))
            return await staged.read(self.backend, path, offset, size)
        path = node.hidden_path or self.path(node)
        if not self.backend.read_ahead:
            return await self.backend.read(path, offset, size)
        return await handle.readahead.read(functools.partial(self.backend.read, path), offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handle(fh)
        if not handle.writable:
            raise FsError(errno.EBADF)
        return self._staged(handle).write(offset, data)

    async def flush(self, fh: int) -> None:
        handle = self.handle(fh)
        staged = handle.node.dirty
        if staged is not None and staged.needs_upload:
            await self._upload(handle.node, staged)

    async def fsync(self, fh: int) -> None:
        handle = self.handle(fh)
        node = handle.node
        if node.detached:
            # Nothing of an unlinked file can reach the sandbox any more.
            return
        if node.dirty is not None and node.dirty.needs_upload:
            await self._upload(node, node.dirty)
        await self.backend.fsync(self.path(node))

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        node = handle.node
        staged = node.dirty
        try:
            if staged is not None and staged.needs_upload:
                await self._upload(node, staged)
        except (BackendError, FsError):
            pass  # _upload logged it and kept the data
        finally:
            remaining = sum(1 for other in self.handles.values() if other.node is node)
            if staged is not None and remaining == 0:
                staged.close()
                node.dirty = None
            self.table.release(node)
            # An open under way still needs the hidden name; it removes it if it fails.
            await self._drop_hidden_if_unused(node)

    async def _upload(self, node: Node, staged: StagedFile) -> None:
        """Send a file's pending writes; on failure keep them and raise EIO."""
        if node.detached:
            # The name is gone, so no program can read these bytes any more,
            # as on a local filesystem where an unlinked file is freed.
            staged.dirty.ranges.clear()
            staged.floor = staged.remote_size = staged.size
            return
        path = self.path(node)
        try:
            try:
                await staged.upload(self.backend, path)
            except BackendError as exc:
                if exc.code != "permission_denied" or not await self._upload_as_owner(staged, path):
                    raise
        except BackendError as exc:
            copy = self._save_recovery(staged, path)
            logger.error("upload of %r failed (%s); the written data is kept in %s", path, exc, copy)
            # A full disk or quota is reported as such, as NFS does at close;
            # every other failure is EIO, the error programs expect there.
            number = exc.errno if exc.code in ("no_space", "quota_exceeded") else errno.EIO
            raise FsError(number) from exc
        self._forget_attr(node)
        try:
            st = await self.backend.stat(path, follow=True)
        except BackendError:
            return
        self.remember(node, st)
        node.cached_version = (st.size, st.mtime_ns)

    async def _upload_as_owner(self, staged: StagedFile, path: str) -> bool:
        """Upload to a file whose owner took away its own write bit after opening it.

        A local filesystem checks permission at open, so a descriptor opened
        for writing goes on writing after fchmod(0o444), as `cp -p` does before
        it closes. The sandbox checks at each upload instead, which fails for
        a user without CAP_DAC_OVERRIDE (a job, an Apptainer instance). As the
        owner may change the mode anyway, the upload adds the write bit, sends
        the data and puts the mode back. Returns False, changing nothing, when
        the sandbox user does not own the file or it has the write bit.
        """
        st = await self.backend.stat(path, follow=True)
        if st.uid != self.backend.identity.uid or st.mode & stat_module.S_IWUSR:
            return False
        mode = stat_module.S_IMODE(st.mode)
        await self.backend.chmod(path, mode | stat_module.S_IWUSR)
        try:
            await staged.upload(self.backend, path)
        finally:
            with trio.CancelScope(shield=True):
                await self.backend.chmod(path, mode)
        logger.info("uploaded %r with its owner's write bit added for the upload only", path)
        return True

    def _save_recovery(self, staged: StagedFile, path: str) -> str:
        try:
            return staged.save_recovery(self.options.recovery_dir, path)
        except OSError as exc:
            logger.error("could not save %r to the recovery directory %s: %s", path, self.options.recovery_dir, exc)
            return "(nowhere: the recovery directory is not writable)"

    async def flush_all(self, timeout: float) -> None:
        """Upload every file's pending writes, as at unmount.

        What is still pending after `timeout` seconds, or after a failed
        upload, is copied to the recovery directory.
        """
        nodes = {handle.node for handle in self.handles.values()}
        with trio.move_on_after(timeout):
            for node in nodes:
                staged = node.dirty
                if staged is not None and staged.needs_upload and not node.detached:
                    try:
                        await self._upload(node, staged)
                    except FsError:
                        pass  # _upload kept a recovery copy and logged it
        for node in nodes:
            staged = node.dirty
            if staged is not None and staged.needs_upload and not node.detached:
                path = self.table.path(node)
                copy = self._save_recovery(staged, path)
                logger.error("pending writes to %r were not uploaded before exit; they are kept in %s", path, copy)
        with trio.move_on_after(HIDDEN_CLEANUP_TIMEOUT):
            for node in nodes:
                hidden, node.hidden_path = node.hidden_path, None
                await self._remove_hidden(hidden)

    # Directories.

    async def opendir(self, ino: int) -> int:
        node = self.node(ino)
        entries = await self.backend.list_dir(self.path(node))
        fh = self._next_fh
        self._next_fh += 1
        self.dir_handles[fh] = entries
        node.open_count += 1
        self.dir_handles_nodes[fh] = node
        return fh

    def readdir_entries(self, fh: int) -> list[tuple[str, Stat]]:
        entries = self.dir_handles.get(fh)
        if entries is None:
            raise FsError(errno.EBADF)
        return entries

    def dir_node(self, fh: int) -> Node:
        return self.dir_handles_nodes[fh]

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)
        node = self.dir_handles_nodes.pop(fh, None)
        if node is not None:
            self.table.release(node)

    def readdir_node(self, parent: Node, name: str, st: Stat) -> tuple[Node, Stat]:
        """Return the node for a listed entry without counting a lookup."""
        node = self.table.add(parent, name)
        return node, self.remember(node, st)

    # The filesystem as a whole.

    async def statfs(self) -> StatFs:
        return await self.backend.statfs(self.backend.root)

    def forget(self, inodes: list[tuple[int, int]]) -> None:
        for ino, count in inodes:
            self.table.forget(ino, count)


def _join(directory: str, name: str) -> str:
    return directory + name if directory.endswith("/") else directory + "/" + name


def check_name(name: str) -> None:
    """Reject a name that must never reach the backend."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise FsError(errno.EINVAL)
    if len(os.fsencode(name)) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
