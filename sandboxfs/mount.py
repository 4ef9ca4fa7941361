"""Mounting, serving and unmounting: the life of one sandboxfs process.

`mount` checks the mount point, then (unless in the foreground) forks a
server process that connects to the sandbox, mounts, and tells the parent
over a pipe that the mount is ready or why it failed. The parent prints that
one line and exits, as sshfs does. trio cannot survive a fork, so the fork
happens before trio starts.

Each mount leaves a state file (pid, source, log file) in the runtime
directory, which `list` and `umount` read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pyfuse3
import trio

from .backend import Backend, ConnectError
from .backends import open_backend
from .core import FilesystemCore
from .fuse_ops import Operations
from .options import MountOptions, state_dir
from .reconnect import ReconnectingBackend
from .sources import Source

logger = logging.getLogger(__name__)

FSTYPE = "fuse.sandboxfs"
# Seconds to upload pending writes when the mount is stopped.
# Seconds between two checks that the mount is still in this mount namespace.
DETACH_CHECK_INTERVAL = 1.0
FLUSH_ON_EXIT_TIMEOUT = 300.0


class MountError(Exception):
    """A mount or unmount failed; the message is one line for the user."""


def runtime_dir() -> str:
    """Return where mount state files live, the same for every shell of a user.

    XDG_RUNTIME_DIR is not used: a login shell sets it and a systemd service
    does not, so the two would not see each other's mounts.
    """
    uid = os.getuid()
    if uid == 0:
        return "/run/sandboxfs"
    user_run = f"/run/user/{uid}"
    if os.path.isdir(user_run):
        return os.path.join(user_run, "sandboxfs")
    return f"/tmp/sandboxfs-{uid}"


def _state_path(mountpoint: str) -> str:
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
    return os.path.join(runtime_dir(), "mounts", f"{digest}.json")


def default_log_file(mountpoint: str) -> str:
    name = mountpoint.strip("/").replace("/", "_") or "root"
    return os.path.join(state_dir(), "log", f"{name}.log")


# Mount table.


@dataclasses.dataclass
class MountInfo:
    mountpoint: str
    source: str
    fstype: str
    pid: int | None = None
    log_file: str | None = None
    # "ok", or "broken: ..." once the server found the sandbox unreachable.
    status: str = "ok"
    # Where the server keeps the data of uploads that failed.
    recovery_dir: str | None = None


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo.
    raw = os.fsencode(field)
    out = bytearray()
    index = 0
    while index < len(raw):
        if raw[index] == 0x5C and index + 3 < len(raw) + 1 and raw[index + 1 : index + 4].isdigit():
            out.append(int(raw[index + 1 : index + 4], 8))
            index += 4
        else:
            out.append(raw[index])
            index += 1
    return os.fsdecode(bytes(out))


def mounted() -> list[MountInfo]:
    """Return the sandboxfs mounts of this mount namespace."""
    mounts = []
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table:
            fields = os.fsdecode(line.rstrip(b"\n")).split(" ")
            separator = fields.index("-")
            fstype, source = fields[separator + 1], fields[separator + 2]
            if fstype != FSTYPE:
                continue
            info = MountInfo(_unescape(fields[4]), _unescape(source), fstype)
            state = _read_state(info.mountpoint)
            if state:
                info.pid = state.get("pid")
                info.log_file = state.get("log_file")
                info.status = state.get("status", "ok")
                info.recovery_dir = state.get("recovery_dir")
            mounts.append(info)
    return mounts


def _read_state(mountpoint: str) -> dict | None:
    try:
        with open(_state_path(mountpoint), encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _write_state(
    mountpoint: str, source: Source, log_file: str | None, recovery_dir: str, status: str = "ok"
) -> None:
    path = _state_path(mountpoint)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    state = {
        "pid": os.getpid(),
        "source": str(source),
        "mountpoint": mountpoint,
        "log_file": log_file,
        "recovery_dir": recovery_dir,
        "status": status,
    }
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(state, file)
    os.replace(path + ".tmp", path)


def _update_status(mountpoint: str, source: Source, log_file: str | None, recovery_dir: str, status: str) -> None:
    # After a lazy unmount the state file may belong to a newer mount.
    state = _read_state(mountpoint)
    if state is None or state.get("pid") == os.getpid():
        _write_state(mountpoint, source, log_file, recovery_dir, status)


def _remove_state(mountpoint: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_state_path(mountpoint))


def _device_at(mountpoint: str) -> str | None:
    """Return the device ("major:minor") of the topmost mount at a path."""
    device = None
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table:
            fields = line.split(b" ")
            if _unescape(os.fsdecode(fields[4])) == mountpoint:
                device = fields[2].decode()
    return device


def _device_mounted(device: str) -> bool:
    """Check whether a mount of `device` ("major:minor") is in this mount namespace."""
    with open("/proc/self/mountinfo", "rb") as table:
        return any(line.split(b" ")[2].decode() == device for line in table)


def _is_mounted(mountpoint: str) -> bool:
    return _device_at(mountpoint) is not None


def pid_alive(pid: int | None) -> bool:
    """Check that a process runs; a zombie (exited, not yet reaped) does not."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            # The state follows the command name, which is in parentheses.
            state = stat_file.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != b"Z"


# Mount.


def check_mountpoint(mountpoint: str) -> str:
    """Return the absolute mount point, or raise MountError saying what to fix."""
    path = os.path.abspath(mountpoint)
    if not os.path.exists("/dev/fuse"):
        raise MountError("FUSE is not available (/dev/fuse is missing): load the fuse module or install fuse3")
    if shutil.which("fusermount3") is None:
        raise MountError("fusermount3 was not found: install the fuse3 package")
    if _is_mounted(path):
        raise MountError(f"mount point {path!r} is busy: something is mounted there; unmount it with `sandboxfs umount {path}`")
    if not os.path.lexists(path):
        raise MountError(f"mount point {path!r} does not exist: create it with `mkdir -p {path}`")
    if not os.path.isdir(path):
        raise MountError(f"mount point {path!r} is not a directory: give a directory, such as an empty one made with mkdir")
    return path


def _fsname(source: Source) -> str:
    # libfuse splits -o options at commas; a backslash escapes one.
    return str(source).replace("\\", "\\\\").replace(",", "\\,")


def _fuse_options(source: Source, options: MountOptions) -> set[str]:
    fuse_options = set(pyfuse3.default_options)
    fuse_options.add(f"fsname={_fsname(source)}")
    fuse_options.add("subtype=sandboxfs")
    if options.read_only:
        fuse_options.add("ro")
    if options.allow_other:
        fuse_options.add("allow_other")
    if options.debug:
        fuse_options.add("debug")
    return fuse_options


async def serve(source: Source, mountpoint: str, options: MountOptions, on_ready, log_file: str | None = None) -> None:
    """Connect, mount, and serve until unmounted or signalled."""
    async with trio.open_nursery() as nursery:
        async def connect() -> Backend:
            return await open_backend(nursery, source, options.timeout)

        backend = ReconnectingBackend(await connect(), connect)
        core = FilesystemCore(backend, options)
        try:
            pyfuse3.init(Operations(core), mountpoint, _fuse_options(source, options))
        except RuntimeError as exc:
            await backend.aclose()
            raise MountError(f"could not mount on {mountpoint!r} ({exc}): check that it is a directory you own") from exc
        # The FUSE connection's device identifies this mount: after a lazy
        # unmount, a newer mount can sit at the same path.
        device = _device_at(mountpoint)
        _write_state(mountpoint, source, log_file, options.recovery_dir)
        backend.on_health_change = lambda status: _update_status(
            mountpoint, source, log_file, options.recovery_dir, status
        )
        logger.info("mounted %s on %s (pid %d)", source, mountpoint, os.getpid())
        on_ready()
        # Set once the FUSE main loop has returned: from then on the session
        # may be closed, and pyfuse3.terminate must not be called.
        main_ended = trio.Event()
        nursery.start_soon(_stop_on_signal, main_ended)
        if device is not None:
            nursery.start_soon(_stop_when_detached, core, device, main_ended)
        try:
            await pyfuse3.main()
        finally:
            main_ended.set()
            with trio.CancelScope(shield=True):
                await core.flush_all(FLUSH_ON_EXIT_TIMEOUT)
                still_ours = device is not None and _device_at(mountpoint) == device
                pyfuse3.close(unmount=still_ours)
                state = _read_state(mountpoint)
                if state is None or state.get("pid") == os.getpid():
                    _remove_state(mountpoint)
                await backend.aclose()
                logger.info("unmounted %s from %s", source, mountpoint)
            nursery.cancel_scope.cancel()


async def _stop_on_signal(main_ended: trio.Event) -> None:
    """End the FUSE main loop at SIGTERM, SIGINT or SIGHUP, unless it has ended already."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if main_ended.is_set():
                logger.info("received %s while already unmounting", signal.Signals(signum).name)
                continue
            logger.info("received %s: uploading pending writes, then unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _stop_when_detached(core: FilesystemCore, device: str, main_ended: trio.Event) -> None:
    """End the server once the mount is gone from this namespace and nothing is open.

    The kernel ends the FUSE connection only when no mount namespace has a
    copy of the mount left. A namespace made while the mount existed (by
    `unshare -m`, or by HTCondor's starter for each condor_ssh_to_job session)
    keeps a copy, so without this check the server would wait for that
    namespace to end after `sandboxfs umount` or `fusermount3 -u`.
    """
    while not main_ended.is_set():
        if not _device_mounted(device) and not core.handles and not core.dir_handles:
            logger.info("the mount was removed from this mount namespace and nothing is open: stopping")
            pyfuse3.terminate()
            return
        with trio.move_on_after(DETACH_CHECK_INTERVAL):
            await main_ended.wait()


def _run_server(source: Source, mountpoint: str, options: MountOptions, on_ready, log_file: str | None) -> None:
    """Run `serve`; raise a ConnectError or MountError as itself, not in a group."""
    try:
        trio.run(serve, source, mountpoint, options, on_ready, log_file)
    except BaseExceptionGroup as group:
        # trio wraps errors raised inside a nursery in an exception group.
        leaves = _leaves(group)
        for leaf in leaves:
            if isinstance(leaf, (ConnectError, MountError)):
                raise leaf from None
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    leaves = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaves(exc))
        else:
            leaves.append(exc)
    return leaves


def _setup_logging(debug: bool, log_file: str | None) -> None:
    level = logging.DEBUG if debug else logging.INFO
    handlers: list[logging.Handler] = []
    if log_file:
        os.makedirs(os.path.dirname(log_file), mode=0o700, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace"))
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    if not debug:
        # pyfuse3 logs each request at DEBUG; keep only its warnings.
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def mount(source: Source, mountpoint: str, options: MountOptions, foreground: bool = False, log_file: str | None = None) -> None:
    """Mount `source`; return once it is ready (or, in the foreground, unmounted)."""
    mountpoint = check_mountpoint(mountpoint)
    if foreground:
        _setup_logging(options.debug, log_file)
        _run_server(source, mountpoint, options, lambda: None, log_file)
        return
    log_file = log_file or default_log_file(mountpoint)
    _daemonize_and_serve(source, mountpoint, options, log_file)


def _daemonize_and_serve(source: Source, mountpoint: str, options: MountOptions, log_file: str) -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        message = _read_all(read_end)
        os.close(read_end)
        if message != b"ready":
            os.waitpid(pid, 0)
            raise MountError(message.decode("utf-8", "replace").strip() or f"the mount process ended without a message; see {log_file}")
        return

    # The server process: never returns.
    os.close(read_end)
    os.setsid()
    code = 0
    try:
        _setup_logging(options.debug, log_file)
        # Processes started from here on (agents, libfuse's fusermount3)
        # inherit these descriptors: they must not hold the caller's
        # terminal or pipes open, and what they print belongs in the log.
        _redirect_stdio(log_file)

        def on_ready() -> None:
            os.write(write_end, b"ready")
            os.close(write_end)

        _run_server(source, mountpoint, options, on_ready, log_file)
    except (ConnectError, MountError) as exc:
        logger.error("%s", exc)
        _report(write_end, str(exc))
        code = 1
    except BaseException as exc:  # the parent must hear of any failure
        logger.exception("mount of %s failed", source)
        _report(write_end, f"mount of {source} failed: {exc!r}; see {log_file}")
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def _report(fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, message.encode("utf-8", "replace"))
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _redirect_stdio(log_file: str) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    log = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


# Unmount.


def find_mount(mountpoint: str) -> MountInfo:
    path = os.path.abspath(mountpoint)
    for info in mounted():
        if info.mountpoint == path:
            return info
    raise MountError(f"{path!r} is not a sandboxfs mount point: `sandboxfs list` shows the active ones")


def umount(mountpoint: str, lazy: bool = False, wait: float = 120.0) -> None:
    """Unmount; return once the server process has uploaded and exited."""
    info = find_mount(mountpoint)
    command = ["fusermount3", "-u"] + (["-z"] if lazy else []) + ["--", info.mountpoint]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit code {result.returncode}"
        if "busy" in detail.lower():
            raise MountError(
                f"mount point {info.mountpoint!r} is busy: a program has a file or directory open there; "
                "close it, or use `sandboxfs umount --lazy`"
            )
        raise MountError(f"could not unmount {info.mountpoint!r}: {detail}")
    deadline = time.monotonic() + wait
    while pid_alive(info.pid) and time.monotonic() < deadline and not lazy:
        time.sleep(0.05)
    if pid_alive(info.pid) and not lazy:
        raise MountError(f"unmounted {info.mountpoint!r}, but its process {info.pid} is still uploading after {wait:.0f} s; see {info.log_file}")
