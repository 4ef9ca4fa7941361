"""sandboxfs: mount a sandbox as a local directory with FUSE.

The public API is the backend protocol (`Backend` and its data types) and the
mount functions; everything else is internal.
"""

from .backend import (
    ERRNO_BY_CODE,
    Backend,
    BackendError,
    ConnectError,
    FileDownloadResponse,
    FileOperationError,
    FileUploadResponse,
    Identity,
    Stat,
    StatFs,
    errno_for,
)

__version__ = "0.1.0"

__all__ = [
    "ERRNO_BY_CODE",
    "Backend",
    "BackendError",
    "ConnectError",
    "FileDownloadResponse",
    "FileOperationError",
    "FileUploadResponse",
    "Identity",
    "Stat",
    "StatFs",
    "errno_for",
]
