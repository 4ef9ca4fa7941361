"""The pyfuse3 Operations: convert FUSE requests to core calls and back.

Handlers are in FUSE operation order. Each converts its arguments (names are
bytes here and `str` decoded with surrogateescape in the core), calls the
core, and converts the result. Errors are translated in one place,
`_translate_errors`: only `FUSEError` leaves a handler, because pyfuse3 ends
the whole mount on any other exception.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat as stat_module

import pyfuse3

from .backend import BackendError, Stat
from .core import Changes, FilesystemCore, FsError
from .inodes import Node

logger = logging.getLogger(__name__)

# Errors that programs provoke in normal use (probing for a file, creating one
# that exists); they are logged only with --debug.
EXPECTED_ERRNOS = {
    errno.ENOENT,
    errno.EEXIST,
    errno.ENOTEMPTY,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
    errno.EROFS,
    errno.EINVAL,
    errno.ENOSYS,
    errno.EXDEV,
    errno.ELOOP,
    # An open of a name replaced through the mount: the kernel looks it up again.
    errno.ESTALE,
}


def _translate_errors(handler):
    """Turn every exception but FUSEError into a FUSEError with an errno."""

    @functools.wraps(handler)
    async def wrapper(self, *args):
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            self._log_failure(handler.__name__, args, exc.errno, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except BackendError as exc:
            self._log_failure(handler.__name__, args, exc.errno, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            # A host-side failure, such as a full disk under the staging
            # directory: return its own errno (ENOSPC) rather than EIO.
            number = exc.errno or errno.EIO
            logger.error("%s%r failed on the host: %s", handler.__name__, args[:2], exc)
            raise pyfuse3.FUSEError(number) from None
        except Exception:
            logger.exception("%s%r failed unexpectedly; returning EIO", handler.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


class Operations(pyfuse3.Operations):
    """FUSE requests served by a `FilesystemCore`."""

    # Without the writeback cache every write reaches the core at once, which
    # keeps close-to-open consistency simple.
    enable_writeback_cache = False
    supports_dot_lookup = False

    def __init__(self, core: FilesystemCore) -> None:
        super().__init__()
        self.core = core
        self.options = core.options

    def _log_failure(self, operation: str, args: tuple, number: int, exc: Exception) -> None:
        level = logging.DEBUG if number in EXPECTED_ERRNOS else logging.WARNING
        if logger.isEnabledFor(level):
            described = [os.fsdecode(arg) if isinstance(arg, bytes) else arg for arg in args[:4]]
            logger.log(level, "%s%r: %s (%s)", operation, tuple(described), errno.errorcode.get(number, number), exc)

    def _entry(self, node: Node | None, st: Stat) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.ino if node is not None else 0
        entry.generation = 0
        entry.entry_timeout = self.options.entry_timeout
        entry.attr_timeout = self.options.attr_timeout
        entry.st_mode = st.mode
        entry.st_nlink = st.nlink
        entry.st_uid = st.uid
        entry.st_gid = st.gid
        entry.st_rdev = st.rdev
        entry.st_size = st.size
        entry.st_blksize = st.blksize
        entry.st_blocks = st.blocks
        entry.st_atime_ns = st.atime_ns
        entry.st_mtime_ns = st.mtime_ns
        entry.st_ctime_ns = st.ctime_ns
        return entry

    def _negative_entry(self) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = 0
        entry.entry_timeout = self.options.negative_timeout
        return entry

    # Names and attributes.

    @_translate_errors
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            node, st = await self.core.lookup(parent_inode, _name(name))
        except BackendError as exc:
            if exc.code == "file_not_found" and self.options.negative_timeout > 0:
                return self._negative_entry()
            raise
        return self._entry(node, st)

    async def forget(self, inode_list):
        # forget has no reply, so an error can only be logged.
        try:
            self.core.forget(inode_list)
        except Exception:
            logger.exception("forget of %d inodes failed", len(inode_list))

    @_translate_errors
    async def getattr(self, inode, ctx=None):
        node, st = await self.core.getattr(inode)
        return self._entry(node, st)

    @_translate_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        changes = Changes()
        if fields.update_mode:
            changes.mode = attr.st_mode
        if fields.update_uid:
            changes.uid = attr.st_uid
        if fields.update_gid:
            changes.gid = attr.st_gid
        if fields.update_size:
            changes.size = attr.st_size
        if fields.update_atime:
            changes.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            changes.mtime_ns = attr.st_mtime_ns
        node, st = await self.core.setattr(inode, changes)
        return self._entry(node, st)

    @_translate_errors
    async def readlink(self, inode, ctx):
        return os.fsencode(await self.core.readlink(inode))

    @_translate_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        node, st = await self.core.mknod(parent_inode, _name(name), mode, rdev)
        return self._entry(node, st)

    @_translate_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        node, st = await self.core.mkdir(parent_inode, _name(name), mode)
        return self._entry(node, st)

    @_translate_errors
    async def unlink(self, parent_inode, name, ctx):
        await self.core.unlink(parent_inode, _name(name))

    @_translate_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self.core.rmdir(parent_inode, _name(name))

    @_translate_errors
    async def symlink(self, parent_inode, name, target, ctx):
        node, st = await self.core.symlink(parent_inode, _name(name), os.fsdecode(target))
        return self._entry(node, st)

    @_translate_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            # RENAME_EXCHANGE and RENAME_WHITEOUT are not offered by backends.
            raise FsError(errno.EINVAL)
        await self.core.rename(
            parent_inode_old,
            _name(name_old),
            parent_inode_new,
            _name(name_new),
            noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
        )

    @_translate_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        node, st = await self.core.link(inode, new_parent_inode, _name(new_name))
        return self._entry(node, st)

    # Files.

    @_translate_errors
    async def open(self, inode, flags, ctx):
        fh, keep_cache = await self.core.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @_translate_errors
    async def read(self, fh, off, size):
        return await self.core.read(fh, off, size)

    @_translate_errors
    async def write(self, fh, off, buf):
        return await self.core.write(fh, off, bytes(buf))

    @_translate_errors
    async def flush(self, fh):
        await self.core.flush(fh)

    @_translate_errors
    async def release(self, fh):
        await self.core.release(fh)

    @_translate_errors
    async def fsync(self, fh, datasync):
        await self.core.fsync(fh)

    # Directories.

    @_translate_errors
    async def opendir(self, inode, ctx):
        return await self.core.opendir(inode)

    @_translate_errors
    async def readdir(self, fh, start_id, token):
        directory = self.core.dir_node(fh)
        entries = self.core.readdir_entries(fh)
        parent = directory.parent or directory
        dots = [(".", directory), ("..", parent)]
        # Offsets 0 and 1 are "." and "..", entry i of the listing is i + 2.
        # The kernel takes no reference for "." and "..", so their lookup
        # counts stay as they are.
        for index in range(start_id, len(entries) + 2):
            if index < 2:
                name, node = dots[index]
                attr = node.attr or Stat(mode=stat_module.S_IFDIR | 0o755)
                if not pyfuse3.readdir_reply(token, name.encode(), self._entry(node, self.core.display(node, attr)), index + 1):
                    return
                continue
            name, st = entries[index - 2]
            node, shown = self.core.readdir_node(directory, name, st)
            if pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(node, shown), index + 1):
                node.lookups += 1
            else:
                self.core.table.forget(node.ino, 0)
                return

    @_translate_errors
    async def releasedir(self, fh):
        self.core.releasedir(fh)

    @_translate_errors
    async def fsyncdir(self, fh, datasync):
        return None

    @_translate_errors
    async def statfs(self, ctx):
        info = await self.core.statfs()
        result = pyfuse3.StatvfsData()
        result.f_bsize = info.bsize
        result.f_frsize = info.frsize
        result.f_blocks = info.blocks
        result.f_bfree = info.bfree
        result.f_bavail = info.bavail
        result.f_files = info.files
        result.f_ffree = info.ffree
        result.f_favail = info.favail
        result.f_namemax = info.namemax
        return result

    # Extended attributes are not offered. ENOSYS makes the kernel stop
    # sending these requests and return EOPNOTSUPP (ENOTSUP) to callers. It
    # also ends the security.capability lookup that the kernel makes before
    # each write, which would otherwise cost one request per write.

    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def listxattr(self, inode, ctx):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_translate_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, node, st = await self.core.create(parent_inode, _name(name), mode, flags)
        return pyfuse3.FileInfo(fh=fh), self._entry(node, st)
