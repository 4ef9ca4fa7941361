"""Containment of symlink targets that the sandbox wrote.

The host kernel resolves a symlink read through the mount on the host. A
sandbox is untrusted, so a link such as `out.txt -> /home/user/.bashrc` must
never be handed to the kernel as it is: a host program writing to `out.txt`
through the mount would write the user's own file.

`contain_target` returns what readlink shows through the mount:

- a relative target made of leading `..` components that do not climb above
  the mount root, then plain names, is returned unchanged;
- any other target (absolute, or with `..` after a name) is resolved lexically
  from the link's directory, with `/..` being `/` as in the kernel; if the
  result is inside the mounted directory it is rewritten relative to the link,
  otherwise it leads outside and is rejected (None).

Lexical resolution is what keeps the result safe: `a/../..` could climb above
the mount root if `a` were a link to `.`, so a `..` after a name is never
passed to the kernel. Where such a name is a symlink in the sandbox, the
rewritten target can name another file than the sandbox would resolve to.

The links the kernel meets while resolving a rewritten target are read through
the mount as well, so each of them is contained in turn.
"""

from __future__ import annotations

import posixpath


def _split(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def _normalize_absolute(path: str) -> list[str]:
    """Resolve `.` and `..` lexically as the kernel does at `/`: `/..` is `/`."""
    parts: list[str] = []
    for part in _split(path):
        if part == "..":
            if parts:
                parts.pop()
        else:
            parts.append(part)
    return parts


def contain_target(target: str, link_path: str, root: str) -> str | None:
    """Return the target to show for the link at sandbox path `link_path`.

    `root` is the sandbox directory shown at the mount point. Returns None when
    the target leads outside of it.
    """
    if not target:
        return None
    root_parts = _normalize_absolute(root)
    link_dir_parts = _normalize_absolute(posixpath.dirname(link_path))
    if link_dir_parts[: len(root_parts)] != root_parts:
        return None
    depth = len(link_dir_parts) - len(root_parts)

    if not target.startswith("/") and _is_canonical_inside(target, depth):
        return target

    absolute = _normalize_absolute(posixpath.join(posixpath.dirname(link_path), target))
    if absolute[: len(root_parts)] != root_parts:
        return None
    return _relative_from(depth, absolute[len(root_parts) :], trailing_slash=target.endswith("/"))


def _is_canonical_inside(target: str, depth: int) -> bool:
    """Check for leading `..` components (at most `depth`), then names only."""
    parts = _split(target)
    climbs = 0
    while climbs < len(parts) and parts[climbs] == "..":
        climbs += 1
    return climbs <= depth and ".." not in parts[climbs:]


def _relative_from(depth: int, parts: list[str], trailing_slash: bool) -> str:
    """Return a relative path from a directory `depth` levels below the root."""
    relative = "/".join([".."] * depth + parts) or "."
    if trailing_slash and not relative.endswith("/"):
        relative += "/"
    return relative
