"""Soak-test sandboxfs mounts with parallel file operations, then check every byte.

For each backend (a host directory, a Debian container with python3, a busybox
container without it), this script starts its own sandbox, mounts it with the
`sandboxfs` command and runs worker threads for a fixed time. Each worker
creates, copies, overwrites, appends to, truncates, renames, deletes and reads
files, and makes and removes directories, in its own directory and in one
directory that all workers share. A ledger records what every path must hold
(the file's bytes, or a directory), so that the outcome of each operation,
errno included, is predicted before it runs.

After the workers stop, the mount is unmounted and the sandbox is compared
with the ledger from inside the sandbox (`sha256sum` through `docker exec`, or
the host directory for `local`). The script exits with status 1 when a file
differs, an unexpected entry exists, or an operation failed in a way the
ledger did not predict; 130 when interrupted. Everything the script started is
removed at the end, also after Ctrl-C or SIGTERM. `--keep` keeps the containers,
the host directory and the mount logs. A backend that failed keeps its mount log
and recovery directory, and the output names their paths.

Usage: scripts/soak [--duration SECONDS] [--workers N] [--backend KIND] [--keep] [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger("soak")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("SANDBOXFS_VENV", os.path.join(REPO, ".venv"))
SANDBOXFS = os.path.join(VENV, "bin", "sandboxfs")
TESTBED = os.path.join(REPO, "scripts", "testbed")

BACKENDS = ("local", "docker-debian", "docker-busybox")
IMAGES = {
    "docker-debian": os.environ.get("SANDBOXFS_TEST_DEBIAN_IMAGE", "sandboxfs-test/debian:latest"),
    "docker-busybox": os.environ.get("SANDBOXFS_TEST_BUSYBOX_IMAGE", "sandboxfs-test/busybox:latest"),
}
CONTAINER_ROOT = "/workspace"
# The directory that the workers use, inside the mounted directory. The ledger's
# paths are relative to it, and "" is the directory itself.
SOAK_DIR = "soak"
SHARED_DIR = "shared"

OWN_FILES = 10
OWN_DIRS = 3
FILES_PER_DIR = 4
SHARED_FILES = 16
SHARED_DIRS = 4

# A worker may still be inside one operation when the time is up. The mount
# replies to every request within its 60 s request timeout, so a worker that is
# still busy after this many more seconds is reported as hung.
JOIN_GRACE_SECONDS = 150
UMOUNT_TIMEOUT_SECONDS = 180
PROGRESS_INTERVAL_SECONDS = 15


# --- ledger -----------------------------------------------------------------


def parent_of(path: str) -> str:
    return os.path.dirname(path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Ledger:
    """The expected content of the soak directory: file bytes and directories by relative path.

    A path whose state became unknown, because an operation on it had an
    outcome that was not predicted, is kept in `uncertain` with everything
    below it. Workers leave such paths alone, and the final check skips them.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {""}
        self.uncertain: set[str] = set()
        self._lock = threading.Lock()
        self._path_locks: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def hold(self, *paths: str):
        """Lock the given paths, in sorted order so that two workers never deadlock."""
        with self._lock:
            locks = [self._path_locks.setdefault(path, threading.Lock()) for path in sorted(set(paths))]
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    def kind(self, path: str) -> str | None:
        with self._lock:
            if path in self.files:
                return "file"
            if path in self.dirs:
                return "dir"
            return None

    def content(self, path: str) -> bytes | None:
        with self._lock:
            return self.files.get(path)

    def children(self, directory: str) -> set[str]:
        with self._lock:
            names = {path for path in self.files if parent_of(path) == directory}
            names |= {path for path in self.dirs if path and parent_of(path) == directory}
        return {os.path.basename(path) for path in names}

    def touches_uncertain(self, path: str) -> bool:
        """Tell whether the path, one of its ancestors or anything below it is uncertain."""
        with self._lock:
            for other in self.uncertain:
                if path == other or path.startswith(other + "/") or other.startswith(path + "/"):
                    return True
        return False

    def is_uncertain(self, path: str) -> bool:
        with self._lock:
            return any(path == other or path.startswith(other + "/") for other in self.uncertain)

    def set_file(self, path: str, data: bytes) -> None:
        with self._lock:
            self.files[path] = data

    def add_dir(self, path: str) -> None:
        with self._lock:
            self.dirs.add(path)

    def remove(self, path: str) -> None:
        with self._lock:
            self.files.pop(path, None)
            self.dirs.discard(path)

    def rename(self, source: str, target: str) -> None:
        """Move a file, or a directory with everything below it, as rename(2) does."""
        with self._lock:
            if source in self.files:
                self.files[target] = self.files.pop(source)
                return
            prefix = source + "/"
            self.dirs.discard(source)
            self.dirs.add(target)
            for path in [path for path in self.files if path.startswith(prefix)]:
                self.files[target + path[len(source) :]] = self.files.pop(path)
            for path in [path for path in self.dirs if path.startswith(prefix)]:
                self.dirs.discard(path)
                self.dirs.add(target + path[len(source) :])

    def mark_uncertain(self, *paths: str) -> None:
        with self._lock:
            self.uncertain.update(paths)


# --- worker statistics ------------------------------------------------------


@dataclass
class Failure:
    """An operation whose result differs from what the ledger predicted."""

    seconds: float
    worker: int
    kind: str
    paths: tuple[str, ...]
    expected: str
    actual: str


@dataclass
class Stats:
    operations: Counter = field(default_factory=Counter)
    expected_errors: Counter = field(default_factory=Counter)
    unexpected_errors: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    reads_verified: int = 0
    read_mismatches: list[Failure] = field(default_factory=list)

    def merge(self, other: Stats) -> None:
        self.operations.update(other.operations)
        self.expected_errors.update(other.expected_errors)
        self.unexpected_errors.update(other.unexpected_errors)
        self.failures.extend(other.failures)
        self.reads_verified += other.reads_verified
        self.read_mismatches.extend(other.read_mismatches)


def errno_name(number: int | None) -> str:
    if number is None:
        return "no error"
    return errno.errorcode.get(number, str(number))


# --- worker -----------------------------------------------------------------


class Worker(threading.Thread):
    """One thread of random operations on a mount until the deadline or the stop event."""

    def __init__(
        self, index: int, mountpoint: str, ledger: Ledger, start: float, deadline: float, stop: threading.Event, seed: int
    ) -> None:
        super().__init__(name=f"worker-{index}", daemon=True)
        self.index = index
        self.base = os.path.join(mountpoint, SOAK_DIR)
        self.ledger = ledger
        self.started_at = start
        self.deadline = deadline
        self.stop = stop
        self.rng = random.Random(seed)
        self.stats = Stats()
        self.done = 0
        # The operation in progress and when it began, for the hung-worker report.
        self.current: tuple[str, float] | None = None
        self.own_dir = f"w{index}"
        self.operations = [
            (self.op_write, 14),
            (self.op_copy, 6),
            (self.op_append, 10),
            (self.op_write_at_offset, 8),
            (self.op_truncate, 4),
            (self.op_rename, 10),
            (self.op_delete, 6),
            (self.op_mkdir, 4),
            (self.op_rmdir, 3),
            (self.op_rename_dir, 2),
            (self.op_read, 20),
            (self.op_list, 5),
        ]

    def run(self) -> None:
        functions = [function for function, _ in self.operations]
        weights = [weight for _, weight in self.operations]
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            operation = self.rng.choices(functions, weights)[0]
            self.current = (operation.__name__[3:].replace("_", "-"), time.monotonic())
            try:
                operation()
            except Exception as exc:
                # A bug in this script, not in the mount: stop this worker and report it.
                logger.exception("worker %d crashed in %s", self.index, self.current[0])
                self.record_failure(self.current[0], (), (), "crash", repr(exc))
                return
            self.current = None
            self.done += 1

    # --- path choice ---

    def own_file(self) -> str:
        slot = self.rng.randrange(OWN_FILES + OWN_DIRS * FILES_PER_DIR)
        if slot < OWN_FILES:
            # One name per worker has a space and non-ASCII letters.
            name = f"f {slot} ünï" if slot == OWN_FILES - 1 else f"f-{slot}"
            return f"{self.own_dir}/{name}"
        slot -= OWN_FILES
        return f"{self.own_dir}/d-{slot // FILES_PER_DIR}/f-{slot % FILES_PER_DIR}"

    def shared_file(self) -> str:
        slot = self.rng.randrange(SHARED_FILES)
        name = f"s {slot} é" if slot % 4 == 3 else f"s-{slot}"
        return f"{SHARED_DIR}/{name}"

    def any_file(self) -> str:
        return self.shared_file() if self.rng.random() < 0.35 else self.own_file()

    def existing_file(self) -> str:
        """Pick a file, preferring one that exists, so that most operations act on real files."""
        path = self.any_file()
        for _ in range(3):
            if self.ledger.kind(path) == "file":
                break
            path = self.any_file()
        return path

    def own_subdir(self) -> str:
        return f"{self.own_dir}/d-{self.rng.randrange(OWN_DIRS)}"

    def any_dir(self) -> str:
        if self.rng.random() < 0.3:
            return f"{SHARED_DIR}/sd-{self.rng.randrange(SHARED_DIRS)}"
        return self.own_subdir()

    def random_data(self, small: bool = False) -> bytes:
        if small:
            return self.rng.randbytes(self.rng.randint(1, 8192))
        size = self.rng.choices(
            [0, self.rng.randint(1, 4096), self.rng.randint(4097, 262144), self.rng.randint(262145, 2_000_000)],
            [5, 50, 35, 10],
        )[0]
        return self.rng.randbytes(size)

    def full(self, path: str) -> str:
        return os.path.join(self.base, path)

    def parent_exists(self, path: str) -> bool:
        return self.ledger.kind(parent_of(path)) == "dir"

    # --- outcome bookkeeping ---

    def attempt(self, kind: str, paths: tuple[str, ...], expected: tuple[int, ...], action) -> bool:
        """Run `action`, compare its outcome with `expected` (errnos; empty: success) and record it.

        Return True when the action succeeded as predicted, so that the caller
        updates the ledger. On any unpredicted outcome, the paths become uncertain.
        """
        self.stats.operations[kind] += 1
        try:
            action()
        except OSError as exc:
            if exc.errno in expected:
                self.stats.expected_errors[errno_name(exc.errno)] += 1
            else:
                self.record_failure(kind, paths, expected, errno_name(exc.errno), str(exc))
            return False
        if expected:
            self.record_failure(kind, paths, expected, "no error", "succeeded")
            return False
        return True

    def record_failure(self, kind: str, paths: tuple[str, ...], expected: tuple[int, ...], name: str, message: str) -> None:
        self.stats.unexpected_errors[name] += 1
        wanted = "/".join(errno_name(number) for number in expected) if expected else "success"
        self.stats.failures.append(
            Failure(time.monotonic() - self.started_at, self.index, kind, paths, wanted, message)
        )
        self.ledger.mark_uncertain(*paths)

    def check_read(self, kind: str, path: str, actual: bytes, expected: bytes) -> None:
        self.stats.reads_verified += 1
        if actual != expected:
            self.stats.read_mismatches.append(
                Failure(
                    time.monotonic() - self.started_at,
                    self.index,
                    kind,
                    (path,),
                    f"{sha256(expected)} ({len(expected)} bytes)",
                    f"{sha256(actual)} ({len(actual)} bytes)",
                )
            )

    def skip(self, *paths: str) -> bool:
        return any(self.ledger.touches_uncertain(path) for path in paths)

    # --- operations ---

    def predict_write(self, path: str, exclusive: bool) -> tuple[int, ...]:
        if not self.parent_exists(path):
            return (errno.ENOENT,)
        if exclusive and self.ledger.kind(path) is not None:
            return (errno.EEXIST,)
        return ()

    def op_write(self) -> None:
        """Create a file (sometimes with O_EXCL) or overwrite one with O_TRUNC."""
        path = self.any_file()
        with self.ledger.hold(path):
            if self.skip(path):
                return
            exists = self.ledger.kind(path) == "file"
            exclusive = not exists and self.rng.random() < 0.3 or exists and self.rng.random() < 0.1
            kind = "overwrite" if exists and not exclusive else "create"
            data = self.random_data()
            sync = self.rng.random() < 0.1

            def action() -> None:
                with open(self.full(path), "xb" if exclusive else "wb") as file:
                    file.write(data)
                    if sync:
                        file.flush()
                        os.fsync(file.fileno())

            if self.attempt(kind, (path,), self.predict_write(path, exclusive), action):
                self.ledger.set_file(path, data)

    def op_copy(self) -> None:
        source, target = self.existing_file(), self.any_file()
        if source == target:
            return
        with self.ledger.hold(source, target):
            if self.skip(source, target):
                return
            data = self.ledger.content(source)
            expected = (errno.ENOENT,) if data is None or not self.parent_exists(target) else ()
            if self.attempt("copy", (source, target), expected, lambda: shutil.copyfile(self.full(source), self.full(target))):
                self.ledger.set_file(target, data)

    def op_append(self) -> None:
        path = self.existing_file()
        with self.ledger.hold(path):
            if self.skip(path):
                return
            old = self.ledger.content(path) or b""
            data = self.random_data(small=True)

            def action() -> None:
                with open(self.full(path), "ab") as file:
                    file.write(data)

            if self.attempt("append", (path,), self.predict_write(path, False), action):
                self.ledger.set_file(path, old + data)

    def op_write_at_offset(self) -> None:
        """Write into an existing file at an offset, then read the whole file back through the same handle."""
        path = self.existing_file()
        with self.ledger.hold(path):
            if self.skip(path):
                return
            old = self.ledger.content(path)
            data = self.random_data(small=True)
            offset = self.rng.randint(0, len(old) + 100) if old is not None else 0
            new = b""
            if old is not None:
                padded = old.ljust(offset, b"\0")
                new = padded[:offset] + data + padded[offset + len(data) :]
            read_back: list[bytes] = []

            def action() -> None:
                with open(self.full(path), "r+b") as file:
                    file.seek(offset)
                    file.write(data)
                    file.flush()
                    file.seek(0)
                    read_back.append(file.read())

            expected = (errno.ENOENT,) if old is None else ()
            if self.attempt("write-at-offset", (path,), expected, action):
                self.check_read("read-after-write", path, read_back[0], new)
                self.ledger.set_file(path, new)

    def op_truncate(self) -> None:
        path = self.existing_file()
        with self.ledger.hold(path):
            if self.skip(path):
                return
            old = self.ledger.content(path)
            size = self.rng.randint(0, len(old) + 5000) if old is not None else 0
            expected = (errno.ENOENT,) if old is None else ()
            if self.attempt("truncate", (path,), expected, lambda: os.truncate(self.full(path), size)):
                self.ledger.set_file(path, old[:size].ljust(size, b"\0"))

    def op_rename(self) -> None:
        """Rename a file to a new name or over an existing file, within or across directories."""
        source, target = self.existing_file(), self.any_file()
        if source == target:
            return
        with self.ledger.hold(source, target):
            if self.skip(source, target):
                return
            source_exists = self.ledger.kind(source) == "file"
            kind = "rename-over" if self.ledger.kind(target) == "file" else "rename"
            expected = () if source_exists and self.parent_exists(target) else (errno.ENOENT,)
            if self.attempt(kind, (source, target), expected, lambda: os.rename(self.full(source), self.full(target))):
                self.ledger.rename(source, target)

    def op_delete(self) -> None:
        """Unlink a file; sometimes a directory, which must fail with EISDIR."""
        path = self.any_dir() if self.rng.random() < 0.1 else self.any_file()
        with self.ledger.hold(path):
            if self.skip(path):
                return
            kind = self.ledger.kind(path)
            expected = {"file": (), "dir": (errno.EISDIR,), None: (errno.ENOENT,)}[kind]
            if self.attempt("delete", (path,), expected, lambda: os.unlink(self.full(path))):
                self.ledger.remove(path)

    def op_mkdir(self) -> None:
        path = self.any_dir()
        with self.ledger.hold(path):
            if self.skip(path):
                return
            expected = (errno.EEXIST,) if self.ledger.kind(path) is not None else ()
            if self.attempt("mkdir", (path,), expected, lambda: os.mkdir(self.full(path))):
                self.ledger.add_dir(path)

    def op_rmdir(self) -> None:
        """Remove a directory; half of the time, own directories are emptied first."""
        path = self.any_dir()
        with self.ledger.hold(path):
            if self.skip(path):
                return
            if path.startswith(self.own_dir + "/") and self.rng.random() < 0.5:
                self.empty_own_dir(path)
            kind = self.ledger.kind(path)
            if kind is None:
                expected = (errno.ENOENT,)
            elif self.ledger.children(path):
                expected = (errno.ENOTEMPTY,)
            else:
                expected = ()
            if self.attempt("rmdir", (path,), expected, lambda: os.rmdir(self.full(path))):
                self.ledger.remove(path)

    def empty_own_dir(self, directory: str) -> None:
        for name in sorted(self.ledger.children(directory)):
            path = f"{directory}/{name}"
            if self.attempt("delete", (path,), (), lambda: os.unlink(self.full(path))):
                self.ledger.remove(path)

    def op_rename_dir(self) -> None:
        """Rename one of the worker's directories, with its files, to another name, possibly over an empty one."""
        source, target = self.own_subdir(), self.own_subdir()
        if source == target:
            return
        with self.ledger.hold(source, target):
            if self.skip(source, target):
                return
            if self.ledger.kind(source) is None:
                expected = (errno.ENOENT,)
            elif self.ledger.kind(target) is not None and self.ledger.children(target):
                expected = (errno.ENOTEMPTY, errno.EEXIST)
            else:
                expected = ()
            if self.attempt("rename-dir", (source, target), expected, lambda: os.rename(self.full(source), self.full(target))):
                self.ledger.rename(source, target)

    def op_read(self) -> None:
        path = self.existing_file()
        with self.ledger.hold(path):
            if self.skip(path):
                return
            expected_data = self.ledger.content(path)
            content: list[bytes] = []

            def action() -> None:
                with open(self.full(path), "rb") as file:
                    content.append(file.read())

            expected = (errno.ENOENT,) if expected_data is None else ()
            if self.attempt("read-verify", (path,), expected, action):
                self.check_read("read-verify", path, content[0], expected_data)

    def op_list(self) -> None:
        """List the worker's own directory or one of its subdirectories and compare the names with the ledger."""
        path = self.own_dir if self.rng.random() < 0.5 else self.own_subdir()
        with self.ledger.hold(path):
            if self.skip(path):
                return
            names: list[set[str]] = []
            expected = () if self.ledger.kind(path) == "dir" else (errno.ENOENT,)
            if not self.attempt("list", (path,), expected, lambda: names.append(set(os.listdir(self.full(path))))):
                return
            expected_names = self.ledger.children(path)
            if names[0] != expected_names:
                missing, extra = sorted(expected_names - names[0]), sorted(names[0] - expected_names)
                self.record_failure("list", (path,), (), "wrong listing", f"missing {missing}, extra {extra}")


# --- sandboxes --------------------------------------------------------------


def run(argv: list[str], check: bool = True, timeout: float | None = 120, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip() if isinstance(result.stderr, bytes) else result.stderr
        raise SoakError(f"{' '.join(argv)} failed with status {result.returncode}: {stderr}")
    return result


class SoakError(Exception):
    """A step of the set-up or clean-up failed; the message names the step."""


@dataclass
class Entry:
    """One entry found in the sandbox: its type ("file", "dir" or what find reported) and a file's sha256."""

    type: str
    digest: str | None = None


class Sandbox:
    """One backend's sandbox and its mount, as this script started them."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.suffix = uuid.uuid4().hex[:8]
        self.container: str | None = None
        self.host_root: str | None = None
        self.mountpoint: str | None = None
        self.state = tempfile.mkdtemp(prefix=f"sbxtest-soak-state-{kind}-")
        self.log_file = os.path.join(self.state, "mount.log")
        self.recovery_dir = os.path.join(self.state, "recovery")
        self.mounted = False
        self.problems: list[str] = []

    @property
    def source(self) -> str:
        if self.container is None:
            return f"local://{self.host_root}"
        return f"docker://{self.container}:{CONTAINER_ROOT}"

    def start(self) -> None:
        """Start the container (or make the host directory) and create the soak directory in it."""
        if self.kind == "local":
            self.host_root = tempfile.mkdtemp(prefix="sbxtest-soak-local-")
            os.mkdir(os.path.join(self.host_root, SOAK_DIR))
            return
        name = f"sbxtest-soak-{self.suffix}"
        # Set before `docker run`, so that an interrupt during it still removes the container.
        self.container = name
        run(["docker", "run", "-d", "--network", "none", "--name", name, IMAGES[self.kind], "sleep", "infinity"])
        run(["docker", "exec", name, "mkdir", f"{CONTAINER_ROOT}/{SOAK_DIR}"])

    def mount(self) -> None:
        self.mountpoint = tempfile.mkdtemp(prefix=f"sbxtest-soak-mnt-{self.kind}-")
        environment = {**os.environ, "XDG_STATE_HOME": self.state, "XDG_CACHE_HOME": os.path.join(self.state, "cache")}
        run(
            [SANDBOXFS, "mount", "--log-file", self.log_file, "--recovery-dir", self.recovery_dir, self.source, self.mountpoint],
            env=environment,
        )
        self.mounted = True

    def unmount(self) -> None:
        """Unmount with `sandboxfs umount`, which waits for pending uploads; detach lazily if that fails."""
        if not self.mounted:
            return
        self.mounted = False
        try:
            result = run([SANDBOXFS, "umount", self.mountpoint], check=False, timeout=UMOUNT_TIMEOUT_SECONDS)
            if result.returncode == 0:
                return
            message = result.stderr.decode(errors="replace").strip()
        except subprocess.TimeoutExpired:
            message = f"timed out after {UMOUNT_TIMEOUT_SECONDS} s"
        self.problems.append(f"sandboxfs umount {self.mountpoint} failed: {message}; detached it with fusermount3 -u -z")
        run(["fusermount3", "-u", "-z", self.mountpoint], check=False)

    def scan(self) -> dict[str, Entry]:
        """List every entry below the soak directory, from inside the sandbox, with each file's sha256."""
        if self.container is None:
            return scan_host_dir(os.path.join(self.host_root, SOAK_DIR))
        return scan_container(self.container, f"{CONTAINER_ROOT}/{SOAK_DIR}")

    def file_size(self, path: str) -> str:
        if self.container is None:
            try:
                return str(os.lstat(os.path.join(self.host_root, SOAK_DIR, path)).st_size)
            except OSError as exc:
                return f"unknown ({exc.strerror})"
        result = run(["docker", "exec", self.container, "stat", "-c", "%s", f"{CONTAINER_ROOT}/{SOAK_DIR}/{path}"], check=False)
        return result.stdout.decode().strip() or "unknown"

    def log_errors(self) -> list[str]:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as file:
                return [line.rstrip("\n") for line in file if " ERROR " in line or "Traceback" in line]
        except FileNotFoundError:
            return []

    def recovery_files(self) -> list[str]:
        try:
            return sorted(os.listdir(self.recovery_dir))
        except FileNotFoundError:
            return []

    def cleanup(self, keep: bool, keep_logs: bool) -> list[str]:
        """Unmount, then remove the container and the directories, unless `keep`; return what was kept.

        `keep_logs` keeps only the state directory (mount log, recovery directory).
        """
        self.unmount()
        if self.mountpoint and os.path.isdir(self.mountpoint):
            with contextlib.suppress(OSError):
                os.rmdir(self.mountpoint)
        if keep:
            kept = [f"state and mount log: {self.state}"]
            if self.container:
                kept.append(f"container: {self.container} (remove with: docker rm -f {self.container})")
            if self.host_root:
                kept.append(f"sandbox directory: {self.host_root}")
            return kept
        if self.container:
            run(["docker", "rm", "-f", self.container], check=False)
        if self.host_root:
            shutil.rmtree(self.host_root, ignore_errors=True)
        if keep_logs:
            return [f"state and mount log: {self.state}"]
        shutil.rmtree(self.state, ignore_errors=True)
        return []


def scan_host_dir(root: str) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, root)
            if os.path.islink(full):
                entries[relative] = Entry("symlink")
            elif os.path.isdir(full):
                entries[relative] = Entry("dir")
            elif os.path.isfile(full):
                with open(full, "rb") as file:
                    entries[relative] = Entry("file", hashlib.file_digest(file, "sha256").hexdigest())
            else:
                entries[relative] = Entry("other")
    return entries


# Three sections, split by lines of "--": directories, `sha256sum` lines of the
# regular files, and `ls -ld` lines of entries of any other type. The
# soak's names contain no newline or backslash, so one line is one entry.
SCAN_SCRIPT = """
cd "$1" || exit 1
find . -mindepth 1 -type d
echo --
find . -type f -exec sha256sum {} +
echo --
find . -mindepth 1 ! -type d ! -type f -exec ls -ld {} +
"""


def scan_container(container: str, root: str) -> dict[str, Entry]:
    result = run(["docker", "exec", container, "sh", "-c", SCAN_SCRIPT, "sh", root])
    sections = result.stdout.decode("utf-8", errors="surrogateescape").split("--\n")
    if len(sections) != 3:
        raise SoakError(f"unexpected output of the scan in {container}: {result.stdout[:500]!r}")
    directories, files, others = (section.splitlines() for section in sections)
    entries = {line[2:]: Entry("dir") for line in directories}
    for line in files:
        digest, path = line.split("  ", 1)
        entries[path[2:]] = Entry("file", digest)
    for line in others:
        entries[line.rsplit(" ./", 1)[-1]] = Entry(f"other: {line}")
    return entries


# --- check and report -------------------------------------------------------


@dataclass
class Check:
    """The comparison of the sandbox's final content with the ledger."""

    files_verified: int = 0
    dirs_verified: int = 0
    mismatches: list[str] = field(default_factory=list)
    unexpected_entries: list[str] = field(default_factory=list)
    skipped_uncertain: list[str] = field(default_factory=list)


def compare(sandbox: Sandbox, ledger: Ledger, entries: dict[str, Entry]) -> Check:
    check = Check()
    for path, data in sorted(ledger.files.items()):
        if ledger.is_uncertain(path):
            check.skipped_uncertain.append(path)
            continue
        entry = entries.get(path)
        expected = f"{sha256(data)} ({len(data)} bytes)"
        if entry is None:
            check.mismatches.append(f"{path}: expected {expected}, actual: missing")
        elif entry.type != "file":
            check.mismatches.append(f"{path}: expected a file {expected}, actual: {entry.type}")
        elif entry.digest != sha256(data):
            check.mismatches.append(f"{path}: expected {expected}, actual {entry.digest} ({sandbox.file_size(path)} bytes)")
        else:
            check.files_verified += 1
    for path in sorted(ledger.dirs - {""}):
        if ledger.is_uncertain(path):
            check.skipped_uncertain.append(path)
            continue
        entry = entries.get(path)
        if entry is None or entry.type != "dir":
            check.mismatches.append(f"{path}: expected a directory, actual: {entry.type if entry else 'missing'}")
        else:
            check.dirs_verified += 1
    for path, entry in sorted(entries.items()):
        if path not in ledger.files and path not in ledger.dirs and not ledger.is_uncertain(path):
            check.unexpected_entries.append(f"{path} ({entry.type})")
    return check


@dataclass
class Run:
    """One backend's soak: its sandbox, ledger, workers and results."""

    sandbox: Sandbox
    ledger: Ledger = field(default_factory=Ledger)
    workers: list[Worker] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    check: Check | None = None
    hung: list[str] = field(default_factory=list)
    # None until the report is printed, so that an interrupted run keeps no logs.
    passed: bool | None = None


def format_counter(counter: Counter) -> str:
    if not counter:
        return "none"
    return ", ".join(f"{name} {count}" for name, count in sorted(counter.items()))


def report(soak: Run, duration: float, limit: int = 20) -> bool:
    """Print one backend's report; return True when it passed."""
    sandbox, stats, check = soak.sandbox, soak.stats, soak.check
    print(f"== {sandbox.kind}: {sandbox.source}, {len(soak.workers)} workers, {duration:.0f} s")
    print(f"operations: {sum(stats.operations.values())} ({format_counter(stats.operations)})")
    print(f"errors, expected: {format_counter(stats.expected_errors)}")
    print(f"errors, unexpected: {format_counter(stats.unexpected_errors)}")
    for failure in stats.failures[:limit]:
        print(
            f"  [{failure.seconds:6.1f} s] worker {failure.worker} {failure.kind} {' -> '.join(failure.paths)}: "
            f"expected {failure.expected}, got {failure.actual}"
        )
    print(f"reads verified through the mount: {stats.reads_verified}, mismatches: {len(stats.read_mismatches)}")
    for failure in stats.read_mismatches[:limit]:
        print(
            f"  [{failure.seconds:6.1f} s] worker {failure.worker} {failure.kind} {failure.paths[0]}: "
            f"expected {failure.expected}, read {failure.actual}"
        )
    for line in soak.hung:
        print(f"hung: {line}")
    for problem in sandbox.problems:
        print(f"problem: {problem}")

    passed = not (stats.failures or stats.read_mismatches or soak.hung or sandbox.problems)
    if check is None:
        print("check inside the sandbox: not run")
        passed = False
    else:
        print(
            f"check inside the sandbox: {check.files_verified} files and {check.dirs_verified} directories verified, "
            f"{len(check.mismatches)} mismatches, {len(check.unexpected_entries)} unexpected entries, "
            f"{len(check.skipped_uncertain)} uncertain paths skipped"
        )
        for line in check.mismatches[:limit]:
            print(f"  mismatch: {line}")
        for line in check.unexpected_entries[:limit]:
            print(f"  unexpected: {line}")
        passed = passed and not check.mismatches and not check.unexpected_entries

    errors = sandbox.log_errors()
    print(f"mount log {sandbox.log_file}: {len(errors)} ERROR lines")
    for line in errors[:5]:
        print(f"  {line}")
    recovered = sandbox.recovery_files()
    print(f"recovery directory: {len(recovered)} files" + (f" ({', '.join(recovered[:5])})" if recovered else ""))
    print(f"result: {'PASS' if passed else 'FAIL'}")
    print()
    return passed


# --- main -------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/soak", description="Run parallel file operations on sandboxfs mounts, then check every file."
    )
    parser.add_argument("--duration", type=float, default=180, help="seconds the workers run (default: 180)")
    parser.add_argument("--workers", type=int, default=4, help="worker threads per backend (default: 4)")
    parser.add_argument(
        "--backend", choices=[*BACKENDS, "all"], default="all", help="which sandbox to mount (default: all, at the same time)"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the containers, the local sandbox directory and the mount logs (mounts are always unmounted)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the workers' random choices (default: random)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.workers < 1:
        parser.error("--duration must be positive and --workers at least 1")
    return args


def set_up_testbed(kinds: list[str]) -> None:
    """Run `scripts/testbed up` for Docker backends (dockerd and images), `deps` otherwise."""
    command = "up" if any(kind != "local" for kind in kinds) else "deps"
    logger.info("running scripts/testbed %s", command)
    result = subprocess.run([TESTBED, command], stdout=sys.stderr)
    if result.returncode != 0:
        raise SoakError(f"scripts/testbed {command} failed with status {result.returncode}")


def start_workers(soaks: list[Run], count: int, duration: float, seed: int, stop: threading.Event) -> float:
    """Create each worker's directory and the shared one through the mount, then start the workers."""
    for soak in soaks:
        base = os.path.join(soak.sandbox.mountpoint, SOAK_DIR)
        for directory in [SHARED_DIR, *(f"w{index}" for index in range(count))]:
            os.mkdir(os.path.join(base, directory))
            soak.ledger.add_dir(directory)
    start = time.monotonic()
    deadline = start + duration
    for number, soak in enumerate(soaks):
        for index in range(count):
            worker_seed = seed * 1000 + number * 100 + index
            soak.workers.append(Worker(index, soak.sandbox.mountpoint, soak.ledger, start, deadline, stop, worker_seed))
    for soak in soaks:
        for worker in soak.workers:
            worker.start()
    return deadline


def wait_for_workers(soaks: list[Run], deadline: float) -> None:
    """Wait until every worker stops, logging progress; report a worker still busy after the grace time as hung."""
    give_up = deadline + JOIN_GRACE_SECONDS
    next_progress = time.monotonic() + PROGRESS_INTERVAL_SECONDS
    while any(worker.is_alive() for soak in soaks for worker in soak.workers) and time.monotonic() < give_up:
        for soak in soaks:
            for worker in soak.workers:
                worker.join(timeout=0.2)
        if time.monotonic() >= next_progress:
            done = ", ".join(f"{soak.sandbox.kind} {sum(worker.done for worker in soak.workers)}" for soak in soaks)
            logger.info("operations so far: %s", done)
            next_progress += PROGRESS_INTERVAL_SECONDS
    for soak in soaks:
        for worker in soak.workers:
            if worker.is_alive() and worker.current is not None:
                operation, since = worker.current
                soak.hung.append(f"worker {worker.index} still in {operation} after {time.monotonic() - since:.0f} s")
            soak.stats.merge(worker.stats)


def soak_backends(args: argparse.Namespace, soaks: list[Run], stop: threading.Event) -> None:
    for soak in soaks:
        logger.info("starting %s", soak.sandbox.kind)
        soak.sandbox.start()
        soak.sandbox.mount()
        logger.info("mounted %s on %s", soak.sandbox.source, soak.sandbox.mountpoint)

    logger.info("running %d workers per backend for %.0f s (seed %d)", args.workers, args.duration, args.seed)
    deadline = start_workers(soaks, args.workers, args.duration, args.seed, stop)
    wait_for_workers(soaks, deadline)

    for soak in soaks:
        logger.info("unmounting %s", soak.sandbox.mountpoint)
        soak.sandbox.unmount()
        soak.check = compare(soak.sandbox, soak.ledger, soak.sandbox.scan())


def raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="soak: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    kinds = list(BACKENDS) if args.backend == "all" else [args.backend]
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)

    stop = threading.Event()
    soaks: list[Run] = []
    status = 0
    try:
        set_up_testbed(kinds)
        soaks = [Run(Sandbox(kind)) for kind in kinds]
        soak_backends(args, soaks, stop)
        print()
        for soak in soaks:
            soak.passed = report(soak, args.duration)
        status = 0 if all(soak.passed for soak in soaks) else 1
        print(f"soak: {'PASS' if status == 0 else 'FAIL'} (seed {args.seed})")
    except KeyboardInterrupt:
        logger.error("interrupted; stopping the workers and cleaning up")
        stop.set()
        status = 130
    except SoakError as exc:
        logger.error("%s", exc)
        stop.set()
        status = 1
    finally:
        # A second Ctrl-C during the clean-up would leave mounts and containers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup(soaks, args.keep)
    return status


def cleanup(soaks: list[Run], keep: bool) -> None:
    # After an interrupt, each worker ends after its current operation, which the
    # mount's 60 s request timeout bounds.
    give_up = time.monotonic() + 70
    for soak in soaks:
        for worker in soak.workers:
            worker.join(timeout=max(0.0, give_up - time.monotonic()))
        try:
            kept = soak.sandbox.cleanup(keep, keep_logs=soak.passed is False)
        except (OSError, SoakError, subprocess.TimeoutExpired) as exc:
            logger.error("cleaning up %s failed: %s", soak.sandbox.kind, exc)
            continue
        for line in kept:
            logger.info("kept %s", line)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
