"""Mount sources: the text a user gives to name a sandboxfs sandbox.

    docker://[USER@]CONTAINER[:/dir]
    apptainer://INSTANCE[:/dir]
    apptainer://INSTANCE[:/dir]?via=ssh://[USER@]HOST[:PORT]
    condor://[USER@]SUBMIT_HOST[:PORT]/CLUSTER.PROC[:/dir]
    condor://local/CLUSTER.PROC[:/dir]
    local:///abs/dir

A source is untrusted text, so each part is checked against what it may
be: container and instance names as Docker and Apptainer allow them,
HTCondor job ids as CLUSTER.PROC digits, absolute directories, and ssh users
and hosts that cannot start with '-'. No part can then be read as an option
by a tool it is handed to.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re


class SourceError(ValueError):
    """A mount source is invalid; the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class SshTarget:
    """A host reached through ssh: `ssh://[USER@]HOST[:PORT]`."""

    host: str
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        """`[USER@]HOST`, as ssh takes it."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"ssh://{self.destination}{port}"


@dataclasses.dataclass(frozen=True)
class HostCommands:
    """The host programs that reach a sandbox, as the command line sets them."""

    # The apptainer command (a name on PATH or a path).
    apptainer: str = "apptainer"
    # The ssh command and its options, as separate words.
    ssh: tuple[str, ...] = ("ssh",)


@dataclasses.dataclass(frozen=True)
class Source:
    scheme: str
    # Container name or id (docker), instance name (apptainer), job id
    # CLUSTER.PROC (condor); empty for local.
    target: str
    # The directory inside the sandbox that the mount shows. For condor, it
    # is relative to the job's scratch directory: "/" is the scratch
    # directory itself.
    root: str
    # The user operations run as inside the sandbox (docker exec --user).
    user: str | None = None
    # The host that runs the sandbox (condor: the submit node), when it is
    # reached through ssh.
    via: SshTarget | None = None
    # How to run the tools that reach the sandbox. Not part of the name.
    commands: HostCommands = dataclasses.field(default_factory=HostCommands, compare=False)

    def __str__(self) -> str:
        if self.scheme == "local":
            return f"local://{self.root}"
        if self.scheme == "condor":
            return _condor_text(self)
        user = f"{self.user}@" if self.user else ""
        root = "" if self.root == "/" else f":{self.root}"
        via = f"?via={self.via}" if self.via is not None else ""
        return f"{self.scheme}://{user}{self.target}{root}{via}"


# Docker's own rule for container names, and hexadecimal ids.
_CONTAINER = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
# A user name or uid[:gid] as `docker exec --user` takes it.
_USER = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_.-]*(:[a-zA-Z0-9_][a-zA-Z0-9_.-]*)?")
# Apptainer 1.4 accepts instance names matching ^[a-zA-Z0-9._-]+$
# (internal/pkg/instance); a leading '-' is rejected here as well.
_INSTANCE = re.compile(r"[a-zA-Z0-9._][a-zA-Z0-9._-]*")
# ssh users and hosts (names, IPv4 addresses, ssh_config aliases). Neither
# may start with '-', or ssh would read it as an option.
_SSH_USER = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_.-]*")
_SSH_HOST = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_.-]*")
# An HTCondor job id: CLUSTER.PROC, ASCII digits only.
_JOB_ID = re.compile(r"[0-9]+\.[0-9]+")
# The submit host name that means this host, reached without ssh.
CONDOR_LOCAL_HOST = "local"

EXAMPLES = (
    "docker://CONTAINER, docker://CONTAINER:/dir, docker://USER@CONTAINER:/dir, "
    "apptainer://INSTANCE:/dir, apptainer://INSTANCE:/dir?via=ssh://USER@HOST:PORT, "
    "condor://USER@SUBMIT_HOST/CLUSTER.PROC:/dir, condor://local/CLUSTER.PROC:/dir or local:///abs/dir"
)


def parse_source(text: str) -> Source:
    """Parse a mount source; raise SourceError naming what is wrong."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise SourceError(f"invalid source {text!r}: expected {EXAMPLES}")
    if scheme == "local":
        return Source("local", "", _directory(rest, text))
    if scheme == "docker":
        return _parse_docker(rest, text)
    if scheme == "apptainer":
        return _parse_apptainer(rest, text)
    if scheme == "condor":
        return _parse_condor(rest, text)
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


def _parse_apptainer(rest: str, text: str) -> Source:
    rest, question, query = rest.partition("?")
    via = _parse_via(query, text) if question else None
    instance, sep, directory = rest.partition(":")
    check_instance_name(instance, text)
    root = _directory(directory, text) if sep else "/"
    return Source("apptainer", instance, root, via=via)


def _parse_condor(rest: str, text: str) -> Source:
    address, slash, job_part = rest.partition("/")
    if not slash:
        raise SourceError(
            f"invalid source {text!r}: expected condor://[USER@]SUBMIT_HOST[:PORT]/CLUSTER.PROC[:/dir] "
            "or condor://local/CLUSTER.PROC[:/dir]"
        )
    job, colon, directory = job_part.partition(":")
    check_job_id(job, text)
    root = _directory(directory, text) if colon else "/"
    if address == CONDOR_LOCAL_HOST:
        return Source("condor", job, root)
    if "[" in address or "]" in address:
        raise SourceError(
            f"invalid submit host {address!r} in {text!r}: IPv6 addresses in brackets are not supported; "
            "use a host name or a Host alias of your ssh config"
        )
    return Source("condor", job, root, via=_parse_ssh_address(address, text))


def check_job_id(job: str, text: str | None = None) -> None:
    """Raise SourceError unless `job` is an HTCondor job id CLUSTER.PROC."""
    if not _JOB_ID.fullmatch(job):
        where = f" in {text!r}" if text is not None else ""
        raise SourceError(f"invalid job id {job!r}{where}: use CLUSTER.PROC as condor_q shows it, such as 42.0")


def _condor_text(source: Source) -> str:
    host = CONDOR_LOCAL_HOST if source.via is None else str(source.via).removeprefix("ssh://")
    root = "" if source.root == "/" else f":{source.root}"
    return f"condor://{host}/{source.target}{root}"


def check_instance_name(instance: str, text: str | None = None) -> None:
    """Raise SourceError unless `instance` is a valid Apptainer instance name."""
    if not _INSTANCE.fullmatch(instance) or set(instance) == {"."}:
        where = f" in {text!r}" if text is not None else ""
        raise SourceError(
            f"invalid instance name {instance!r}{where}: use a name as `apptainer instance list` "
            "shows it (letters, digits, '_', '.', '-', not starting with '-')"
        )


def _parse_via(query: str, text: str) -> SshTarget:
    key, equals, value = query.partition("=")
    if key != "via" or not equals:
        raise SourceError(f"invalid option {query!r} in {text!r}: the only option is via=ssh://[USER@]HOST[:PORT]")
    scheme, sep, address = value.partition("://")
    if scheme != "ssh" or not sep:
        raise SourceError(f"invalid via {value!r} in {text!r}: use ssh://[USER@]HOST[:PORT]")
    return _parse_ssh_address(address, text)


def _parse_ssh_address(address: str, text: str) -> SshTarget:
    user = None
    if "@" in address:
        user, _, address = address.rpartition("@")
        check_ssh_user(user, text)
    host, colon, port_text = address.partition(":")
    check_ssh_host(host, text)
    port = _port(port_text, text) if colon else None
    return SshTarget(host, user, port)


def check_ssh_user(user: str, text: str | None = None) -> None:
    """Raise SourceError unless `user` is a safe ssh user name."""
    if not _SSH_USER.fullmatch(user):
        where = f" in {text!r}" if text is not None else ""
        raise SourceError(
            f"invalid ssh user {user!r}{where}: use letters, digits, '_', '.', '-', not starting with '-'"
        )


def check_ssh_host(host: str, text: str | None = None) -> None:
    """Raise SourceError unless `host` is a safe ssh host name or IPv4 address."""
    if not _SSH_HOST.fullmatch(host):
        where = f" in {text!r}" if text is not None else ""
        raise SourceError(
            f"invalid ssh host {host!r}{where}: use a host name, an IPv4 address or a Host alias "
            "of your ssh config (letters, digits, '_', '.', '-', not starting with '-')"
        )


def _port(port_text: str, text: str) -> int:
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise SourceError(f"invalid ssh port {port_text!r} in {text!r}: give a number from 1 to 65535")
    return int(port_text)


def _directory(directory: str, text: str) -> str:
    if not directory.startswith("/"):
        raise SourceError(f"invalid directory {directory!r} in {text!r}: give an absolute path such as /workspace")
    if "\0" in directory or any(part == ".." for part in directory.split("/")):
        raise SourceError(f"invalid directory {directory!r} in {text!r}: it must not contain '..' or NUL")
    normalized = posixpath.normpath(directory)
    # normpath keeps a leading "//" as POSIX allows; one slash is meant here.
    return "/" + normalized.lstrip("/")
