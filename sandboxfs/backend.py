"""The backend protocol: what sandboxfs needs from a sandbox.

This module imports neither pyfuse3 nor any backend. It holds:

- the data types of LangChain's deepagents file protocol (`FileUploadResponse`,
  `FileDownloadResponse` and the `FileOperationError` codes), so that a sandbox
  object written for deepagents can be adapted and a sandboxfs backend can be
  handed to code that expects deepagents' `aupload_files` / `adownload_files`;
- the extra error codes a filesystem needs, and the one table from code to errno;
- `Stat` and `StatFs`, the attributes a backend reports;
- `Backend`, the abstract base class every backend implements.

All paths given to and returned by a backend are absolute paths inside the
sandbox, as `str`. Names that are not valid UTF-8 travel as `str` decoded with
`os.fsdecode` (the surrogateescape error handler), so every byte string that a
Linux filesystem accepts round-trips.

All methods are async and run on trio.
"""

from __future__ import annotations

import abc
import dataclasses
import errno
import stat as stat_module
from typing import Literal

# The four codes of deepagents' FileOperationError, spelled exactly as there.
FileOperationError = Literal[
    "file_not_found",
    "permission_denied",
    "is_directory",
    "invalid_path",
]

# One line per code. A code missing here (a newer peer, a typo) becomes EIO.
ERRNO_BY_CODE: dict[str, int] = {
    "file_not_found": errno.ENOENT,
    "permission_denied": errno.EACCES,
    "is_directory": errno.EISDIR,
    "invalid_path": errno.EINVAL,
    "not_permitted": errno.EPERM,
    "not_a_directory": errno.ENOTDIR,
    "already_exists": errno.EEXIST,
    "not_empty": errno.ENOTEMPTY,
    "read_only": errno.EROFS,
    "no_space": errno.ENOSPC,
    "quota_exceeded": errno.EDQUOT,
    "name_too_long": errno.ENAMETOOLONG,
    "file_too_large": errno.EFBIG,
    "too_many_links": errno.EMLINK,
    "symlink_loop": errno.ELOOP,
    "cross_device": errno.EXDEV,
    "busy": errno.EBUSY,
    "text_busy": errno.ETXTBSY,
    "invalid_argument": errno.EINVAL,
    "not_supported": errno.EOPNOTSUPP,
    "bad_descriptor": errno.EBADF,
    "io_error": errno.EIO,
    # A backend that sent no reply within its bound. ETIMEDOUT would be
    # accurate, but programs doing file I/O do not expect it. They handle EIO.
    "timed_out": errno.EIO,
    # The sandbox or the channel to it is gone (container stopped, helper
    # killed). ENOTCONN is the error users of network filesystems see for a dead
    # connection, so it points them at the sandbox, not the disk.
    "unavailable": errno.ENOTCONN,
}

CODE_BY_ERRNO: dict[int, str] = {}
for _code, _errno in ERRNO_BY_CODE.items():
    CODE_BY_ERRNO.setdefault(_errno, _code)
CODE_BY_ERRNO[errno.ENOTSUP] = "not_supported"
CODE_BY_ERRNO[errno.EIO] = "io_error"


def errno_for(code: str | None) -> int:
    """Return the errno for a backend error code; unknown codes give EIO."""
    if code is None:
        return errno.EIO
    return ERRNO_BY_CODE.get(code, errno.EIO)


def code_for_errno(number: int) -> str:
    """Return the backend error code for an OS errno; unknown ones give io_error."""
    return CODE_BY_ERRNO.get(number, "io_error")


class BackendError(Exception):
    """An operation failed in the sandbox.

    `code` is one of the keys of `ERRNO_BY_CODE` (or an unknown code, which
    the filesystem reports as EIO); `path` is the sandbox path concerned.
    """

    def __init__(self, code: str, path: str = "", message: str = "") -> None:
        self.code = code
        self.path = path
        self.message = message
        super().__init__(f"{code}: {path}" + (f": {message}" if message else ""))

    @property
    def errno(self) -> int:
        return errno_for(self.code)


class ConnectError(Exception):
    """A sandbox could not be reached; the message is one line for the user."""


@dataclasses.dataclass
class FileUploadResponse:
    """The result of one upload, as in deepagents: `error` is None on success."""

    path: str
    error: str | None = None


@dataclasses.dataclass
class FileDownloadResponse:
    """The result of one download, as in deepagents: `content` is None on error."""

    path: str
    content: bytes | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Stat:
    """Attributes of one file, as lstat(2) reports them in the sandbox.

    Times are nanoseconds since the epoch. `uid` and `gid` are the sandbox's
    own numbers; the filesystem layer maps them for display.
    """

    mode: int
    size: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    ino: int = 0
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    blocks: int = 0
    blksize: int = 4096

    @property
    def is_dir(self) -> bool:
        return stat_module.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat_module.S_ISLNK(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat_module.S_ISREG(self.mode)


@dataclasses.dataclass(frozen=True)
class StatFs:
    """Filesystem statistics, as statvfs(3) reports them in the sandbox."""

    bsize: int = 4096
    frsize: int = 4096
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    favail: int = 0
    namemax: int = 255


@dataclasses.dataclass(frozen=True)
class Identity:
    """The user that file operations run as inside the sandbox."""

    uid: int
    gid: int


class Backend(abc.ABC):
    """One sandbox, reached for file operations.

    Every method raises `BackendError` for an error the sandbox reports (its
    `code` says which) and for a lost connection (code `unavailable`) or a
    request that got no reply in time (code `timed_out`). Methods that take a
    path do not follow a symlink in the last component unless they say so.

    `root` is the sandbox directory that the mount shows; `identity` is the
    user the operations run as. Both are valid once the backend is connected.
    """

    root: str = "/"
    identity: Identity = Identity(0, 0)

    # Maximum bytes per read or write request that a backend handles well;
    # the filesystem splits larger transfers.
    max_chunk: int = 1 << 20

    # Bytes to fetch ahead of a program that reads a file in order, 0 for
    # none. It pays where each request is costly, as on the shell fallback,
    # which starts a process per request. Over the helper, the kernel's own
    # read-ahead with several requests in flight is faster.
    read_ahead: int = 0

    # How many times the mount connected to the sandbox again after a fault;
    # a file opened under an older generation may hold stale data.
    generation: int = 0

    @property
    def connected(self) -> bool:
        """False once the backend has found its connection lost for good.

        A backend that makes a new connection per request has nothing to lose
        and stays True; its requests report `unavailable` themselves.
        """
        return True

    async def aclose(self) -> None:
        """Release the connection; pending calls fail with `unavailable`."""

    # deepagents-compatible whole-file transfer. Partial success is allowed:
    # one response per input, in input order, errors in `error`.

    async def aupload_files(
        self, files: list[tuple[str, bytes]]
    ) -> list[FileUploadResponse]:
        """Write each (path, content): create or truncate, then write."""
        responses = []
        for path, content in files:
            if not path.startswith("/"):
                responses.append(FileUploadResponse(path, "invalid_path"))
                continue
            try:
                await self.write_file(path, content)
            except BackendError as exc:
                responses.append(FileUploadResponse(path, exc.code))
            else:
                responses.append(FileUploadResponse(path, None))
        return responses

    async def adownload_files(self, paths: list[str]) -> list[FileDownloadResponse]:
        """Read each path whole."""
        responses = []
        for path in paths:
            if not path.startswith("/"):
                responses.append(FileDownloadResponse(path, None, "invalid_path"))
                continue
            try:
                content = await self.read_file(path)
            except BackendError as exc:
                responses.append(FileDownloadResponse(path, None, exc.code))
            else:
                responses.append(FileDownloadResponse(path, content, None))
        return responses

    async def read_file(self, path: str) -> bytes:
        """Return a whole regular file (following symlinks, as open(2) does)."""
        st = await self.stat(path, follow=True)
        if st.is_dir:
            raise BackendError("is_directory", path)
        chunks = []
        offset = 0
        while True:
            chunk = await self.read(path, offset, self.max_chunk)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    async def write_file(self, path: str, content: bytes, mode: int = 0o644) -> None:
        """Create or truncate `path`, then write `content` to it."""
        try:
            await self.create(path, mode, exclusive=False)
        except BackendError as exc:
            if exc.code != "already_exists":
                raise
        await self.truncate(path, 0)
        for offset in range(0, len(content), self.max_chunk):
            await self.write(path, offset, content[offset : offset + self.max_chunk])

    # Metadata.

    @abc.abstractmethod
    async def stat(self, path: str, follow: bool = False) -> Stat:
        """Return the attributes of `path` (lstat(2); stat(2) if `follow`)."""

    @abc.abstractmethod
    async def list_dir(self, path: str) -> list[tuple[str, Stat]]:
        """Return each entry of a directory but `.` and `..`, with its lstat."""

    @abc.abstractmethod
    async def statfs(self, path: str) -> StatFs:
        """Return statvfs(3) of the filesystem holding `path`."""

    @abc.abstractmethod
    async def readlink(self, path: str) -> str:
        """Return the target of a symlink, unchanged."""

    # Data. `read` and `write` work on existing regular files and follow
    # symlinks, as open(2) without O_NOFOLLOW does.

    async def open_check(self, path: str, writable: bool) -> Stat:
        """Check that the sandbox user may open `path` as open(2) would.

        Returns the file's attributes (following symlinks). The default only
        stats the file; backends that can open it report EACCES and EROFS at
        open time, as a local filesystem does, instead of at the first read
        or the upload.
        """
        return await self.stat(path, follow=True)

    @abc.abstractmethod
    async def read(self, path: str, offset: int, size: int) -> bytes:
        """Return up to `size` bytes from `offset`; short only at end of file."""

    @abc.abstractmethod
    async def write(self, path: str, offset: int, data: bytes) -> None:
        """Write `data` at `offset` (pwrite(2)); the file keeps its other bytes."""

    @abc.abstractmethod
    async def truncate(self, path: str, size: int) -> None:
        """Set the size of a regular file (truncate(2))."""

    async def fsync(self, path: str) -> None:
        """Ask the sandbox to make the file durable; by default, nothing."""

    # Namespace.

    @abc.abstractmethod
    async def create(self, path: str, mode: int, exclusive: bool = True) -> Stat:
        """Create a regular file (open with O_CREAT, and O_EXCL if `exclusive`)."""

    @abc.abstractmethod
    async def mkdir(self, path: str, mode: int) -> Stat:
        """Create a directory."""

    @abc.abstractmethod
    async def mknod(self, path: str, mode: int, rdev: int) -> Stat:
        """Create a FIFO, socket or device node (mknod(2))."""

    @abc.abstractmethod
    async def unlink(self, path: str) -> None:
        """Remove a non-directory."""

    @abc.abstractmethod
    async def rmdir(self, path: str) -> None:
        """Remove an empty directory."""

    @abc.abstractmethod
    async def rename(self, old: str, new: str, noreplace: bool = False) -> None:
        """Rename as rename(2); with `noreplace`, fail with already_exists."""

    @abc.abstractmethod
    async def symlink(self, target: str, path: str) -> Stat:
        """Create a symlink at `path` that points to `target`, unchanged."""

    @abc.abstractmethod
    async def link(self, existing: str, new: str) -> Stat:
        """Create a hard link `new` to `existing`."""

    # Attributes. `None` leaves a value unchanged.

    @abc.abstractmethod
    async def chmod(self, path: str, mode: int) -> None:
        """Set the permission bits (follows symlinks, as chmod(2))."""

    @abc.abstractmethod
    async def chown(self, path: str, uid: int | None, gid: int | None) -> None:
        """Set the owner and group without following a final symlink (lchown)."""

    @abc.abstractmethod
    async def utimens(
        self, path: str, atime_ns: int | None, mtime_ns: int | None
    ) -> None:
        """Set access and modification times without following a final symlink."""
