"""Mount sources: the text a user gives to name a sandboxfs sandbox.

    docker://[USER@]CONTAINER[:/dir]
    local:///abs/dir

A source is untrusted text: each part is checked against what it may be
(container names as Docker allows them, absolute directories), so that no
part can be read as an option by a tool it is handed to.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re


class SourceError(ValueError):
    """A mount source is invalid; the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class Source:
    scheme: str
    # Container name or id (docker); empty for local.
    target: str
    # The directory inside the sandbox that the mount shows.
    root: str
    # The user operations run as inside the sandbox (docker exec --user).
    user: str | None = None

    def __str__(self) -> str:
        if self.scheme == "local":
            return f"local://{self.root}"
        user = f"{self.user}@" if self.user else ""
        root = "" if self.root == "/" else f":{self.root}"
        return f"{self.scheme}://{user}{self.target}{root}"


# Docker's own rule for container names, and hexadecimal ids.
_CONTAINER = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
# A user name or uid[:gid] as `docker exec --user` takes it.
_USER = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_.-]*(:[a-zA-Z0-9_][a-zA-Z0-9_.-]*)?")

EXAMPLES = "docker://CONTAINER, docker://CONTAINER:/dir, docker://USER@CONTAINER:/dir or local:///abs/dir"


def parse_source(text: str) -> Source:
    """Parse a mount source; raise SourceError naming what is wrong."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise SourceError(f"invalid source {text!r}: expected {EXAMPLES}")
    if scheme == "local":
        return Source("local", "", _directory(rest, text))
    if scheme == "docker":
        return _parse_docker(rest, text)
    raise SourceError(f"unknown source type {scheme!r} in {text!r}: expected {EXAMPLES}")


def _parse_docker(rest: str, text: str) -> Source:
    user = None
    if "@" in rest:
        user, _, rest = rest.partition("@")
        if not _USER.fullmatch(user):
            raise SourceError(f"invalid user {user!r} in {text!r}: use a user name or UID[:GID]")
    container, sep, directory = rest.partition(":")
    if not _CONTAINER.fullmatch(container):
        raise SourceError(
            f"invalid container name {container!r} in {text!r}: "
            "use a name or id as `docker ps` shows it (letters, digits, '_', '.', '-', at least two characters)"
        )
    root = _directory(directory, text) if sep else "/"
    return Source("docker", container, root, user)


def _directory(directory: str, text: str) -> str:
    if not directory.startswith("/"):
        raise SourceError(f"invalid directory {directory!r} in {text!r}: give an absolute path such as /workspace")
    if "\0" in directory or any(part == ".." for part in directory.split("/")):
        raise SourceError(f"invalid directory {directory!r} in {text!r}: it must not contain '..' or NUL")
    normalized = posixpath.normpath(directory)
    # normpath keeps a leading "//" as POSIX allows; one slash is meant here.
    return "/" + normalized.lstrip("/")
