"""Mount options shared by the filesystem core, the FUSE layer and the CLI."""

from __future__ import annotations

import dataclasses
import os


def state_dir() -> str:
    """Return the per-user state directory ($XDG_STATE_HOME/sandboxfs)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "sandboxfs")


def cache_dir() -> str:
    """Return the per-user cache directory ($XDG_CACHE_HOME/sandboxfs)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sandboxfs")


@dataclasses.dataclass
class MountOptions:
    """The settings of one mount; the CLI documents the option behind each field."""

    # Seconds the kernel and the core keep attributes and names.
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    # Seconds the kernel remembers that a name does not exist.
    negative_timeout: float = 1.0
    # Seconds to wait for the sandbox's reply to one request; then the
    # request fails with EIO and the mount connects again.
    timeout: float = 60.0
    # "user": the sandbox user's files appear owned by the mounting user.
    # "none": uids and gids are shown as the sandbox has them.
    idmap: str = "user"
    # "contain": symlink targets that leave the mount are rejected and
    # absolute ones rewritten; "raw": targets are shown as the sandbox has them.
    symlinks: str = "contain"
    read_only: bool = False
    allow_other: bool = False
    recovery_dir: str = dataclasses.field(default_factory=lambda: os.path.join(state_dir(), "recovery"))
    staging_dir: str = dataclasses.field(default_factory=lambda: os.path.join(cache_dir(), "staging"))
    debug: bool = False
