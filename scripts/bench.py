"""Benchmark sandboxfs against a baseline measured in the same run.

There are three backends. A Debian container with python3 is served by the
helper program, and a busybox container without python3 by the shell
fallback. The third is a host directory mounted through `local://`. For each, this
script starts its own sandbox, mounts it with the `sandboxfs` command, and
times each operation twice. One run goes through the mount. The other is the
baseline, which does the same work without sandboxfs: `docker cp` and
`docker exec` for a container, plain `cp`, `ls` and `grep` on the host
directory. The runs of the two alternate, so that load from other programs
on the machine falls on both, and the table reports the median of each and
the ratio of the medians.

Every copy is checked with sha256, computed in the sandbox for data copied in
and on the host for data copied out, and every listing and search is checked
against what the sandbox contains, so that a fast wrong result fails the run.
Before each timed read through the mount, the mount is unmounted and mounted
again (untimed), so that neither the kernel nor sandboxfs has anything cached.
The sandbox's files stay in the host's page cache for both sides.

Everything the script starts (containers named sbxbench-*, temporary
directories, mounts) is removed at the end, also after a failure, Ctrl-C,
SIGTERM or SIGHUP.

Usage: scripts/bench [--markdown] [--repeat N] [--backend KIND]...
Exit status: 0, 1 when a step or a check fails, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("bench")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("SANDBOXFS_VENV", os.path.join(REPO, ".venv"))
SANDBOXFS = os.path.join(VENV, "bin", "sandboxfs")
TESTBED = os.path.join(REPO, "scripts", "testbed")

BACKENDS = ("docker-debian", "docker-busybox", "local")
IMAGES = {
    "docker-debian": os.environ.get("SANDBOXFS_TEST_DEBIAN_IMAGE", "sandboxfs-test/debian:latest"),
    "docker-busybox": os.environ.get("SANDBOXFS_TEST_BUSYBOX_IMAGE", "sandboxfs-test/busybox:latest"),
}
CONTAINER_ROOT = "/workspace"
CONTAINER_PREFIX = "sbxbench-"
NEEDLE = "sbxbench-needle"
COMMAND_TIMEOUT_SECONDS = 300
UMOUNT_TIMEOUT_SECONDS = 180


@dataclass(frozen=True)
class Workload:
    """The sizes one backend is measured with."""

    large_mib: int
    tree_dirs: int
    tree_files_per_dir: int
    small_dirs: int
    small_files_per_dir: int
    find_ls: bool  # busybox's find has no -ls

    @property
    def tree_entries(self) -> int:
        return self.tree_dirs * (self.tree_files_per_dir + 1)

    @property
    def small_files(self) -> int:
        return self.small_dirs * self.small_files_per_dir


FULL = Workload(large_mib=64, tree_dirs=20, tree_files_per_dir=49, small_dirs=10, small_files_per_dir=50, find_ls=True)
# The shell fallback runs one `docker exec` per operation, which costs tens of
# milliseconds, so the busybox container gets a smaller set that keeps its part
# near a minute on 2 cores.
SMALL = Workload(large_mib=8, tree_dirs=4, tree_files_per_dir=49, small_dirs=2, small_files_per_dir=5, find_ls=False)
WORKLOADS = {"docker-debian": FULL, "docker-busybox": SMALL, "local": FULL}


class BenchError(Exception):
    """A step or a content check failed; the message names it."""


@dataclass
class Result:
    """The timed runs of one operation through the mount and of its baseline."""

    backend: str
    operation: str
    baseline: str
    size: int | None  # bytes of file data that each run moves, for MB/s
    sandboxfs_seconds: list[float] = field(default_factory=list)
    baseline_seconds: list[float] = field(default_factory=list)

    @property
    def sandboxfs_median(self) -> float:
        return statistics.median(self.sandboxfs_seconds)

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline_seconds)

    @property
    def ratio(self) -> float:
        return self.sandboxfs_median / self.baseline_median


# --- commands ---------------------------------------------------------------


def run(argv: list[str], check: bool = True, timeout: float = COMMAND_TIMEOUT_SECONDS, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        raise BenchError(f"{' '.join(argv)} failed with status {result.returncode}: {stderr}")
    return result


def timed(argv: list[str]) -> tuple[float, bytes]:
    """Run `argv`, and return its wall-clock time in seconds and its stdout; raise BenchError if it fails."""
    start = time.perf_counter()
    result = run(argv)
    return time.perf_counter() - start, result.stdout


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def host_digests(root: str) -> dict[str, str]:
    """Return the sha256 of every regular file below `root`, keyed by its path relative to `root`."""
    digests = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            digests[os.path.relpath(path, root)] = sha256_file(path)
    return digests


def check_equal(what: str, actual, expected) -> None:
    if actual == expected:
        return
    if isinstance(expected, (int, str)):
        raise BenchError(f"content check failed: {what} is {actual!r}, expected {expected!r}")
    raise BenchError(f"content check failed: {what} has {len(actual)} entries, expected {len(expected)}, or their content differs")


# --- sandboxes --------------------------------------------------------------


def is_mounted(path: str) -> bool:
    """Return whether `path` is a mount point in /proc/self/mounts.

    os.path.ismount is not enough: it returns False for a FUSE mount whose
    process is gone, because stat fails there with ENOTCONN.
    """
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            target = line.split()[1]
            # The kernel writes space, tab, newline and backslash as octal escapes.
            for escape, character in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                target = target.replace(escape, character)
            if target == path:
                return True
    return False


class Sandbox:
    """One backend's sandbox and its mount, both started by this script.

    `root` is the path of the mounted directory inside the sandbox:
    /workspace in a container, the host directory for `local`.
    """

    def __init__(self, kind: str, workdir: str) -> None:
        self.kind = kind
        self.state = tempfile.mkdtemp(prefix=f"state-{kind}-", dir=workdir)
        self.mountpoint = tempfile.mkdtemp(prefix=f"mnt-{kind}-", dir=workdir)
        self.log_file = os.path.join(self.state, "mount.log")
        self.container: str | None = None
        self.root = CONTAINER_ROOT
        self.mounted = False
        self.removed = False

    @property
    def source(self) -> str:
        if self.container is None:
            return f"local://{self.root}"
        return f"docker://{self.container}:{self.root}"

    def start(self, workdir: str) -> None:
        if self.kind == "local":
            self.root = tempfile.mkdtemp(prefix="sandbox-local-", dir=workdir)
            return
        name = f"{CONTAINER_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Set before `docker run`, so that an interrupt during it still removes the container.
        self.container = name
        run(["docker", "run", "-d", "--network", "none", "--name", name, IMAGES[self.kind], "sleep", "infinity"])
        run(["docker", "exec", name, "mkdir", "-p", self.root])

    def mount(self) -> None:
        environment = {**os.environ, "XDG_STATE_HOME": self.state, "XDG_CACHE_HOME": os.path.join(self.state, "cache")}
        argv = [SANDBOXFS, "mount", "--log-file", self.log_file, "--recovery-dir", os.path.join(self.state, "recovery")]
        run([*argv, self.source, self.mountpoint], env=environment)
        self.mounted = True

    def unmount(self) -> None:
        """Unmount with `sandboxfs umount`, which waits for pending uploads; detach lazily if that fails.

        The mount table decides, not `self.mounted` alone, so that a mount left
        by an interrupted `sandboxfs mount` or `umount` is still removed.
        """
        if not (self.mounted or is_mounted(self.mountpoint)):
            return
        try:
            result = run([SANDBOXFS, "umount", self.mountpoint], check=False, timeout=UMOUNT_TIMEOUT_SECONDS)
            message = result.stderr.decode(errors="replace").strip()
            if result.returncode == 0:
                self.mounted = False
                return
        except subprocess.TimeoutExpired:
            message = f"timed out after {UMOUNT_TIMEOUT_SECONDS} s"
        logger.error("sandboxfs umount %s failed (%s); detaching it with fusermount3 -u -z", self.mountpoint, message)
        run(["fusermount3", "-u", "-z", self.mountpoint], check=False)
        self.mounted = False

    def remount(self) -> None:
        """Unmount and mount again, so that the next operation finds no cached data or attributes."""
        self.unmount()
        self.mount()

    def in_mount(self, name: str) -> str:
        return os.path.join(self.mountpoint, name)

    def in_sandbox(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exec_argv(self, argv: list[str]) -> list[str]:
        """Return the command line that runs `argv` in the sandbox."""
        if self.container is None:
            return argv
        return ["docker", "exec", self.container, *argv]

    def copy_in_argv(self, source: str, name: str) -> list[str]:
        """Return the baseline command that copies host file or directory `source` to `name` in the sandbox."""
        if self.container is None:
            return ["cp", "-r", source, self.in_sandbox(name)]
        return ["docker", "cp", source, f"{self.container}:{self.in_sandbox(name)}"]

    def copy_out_argv(self, name: str, target: str) -> list[str]:
        if self.container is None:
            return ["cp", "-r", self.in_sandbox(name), target]
        return ["docker", "cp", f"{self.container}:{self.in_sandbox(name)}", target]

    @property
    def copy_label(self) -> str:
        return "cp" if self.container is None else "docker cp"

    def exec_label(self, command: str) -> str:
        return command if self.container is None else f"docker exec {command}"

    def shell(self, script: str, *args: str) -> bytes:
        """Run a POSIX shell script in the sandbox, with `args` as $1..., and return its stdout."""
        return run(self.exec_argv(["sh", "-c", script, "sh", *args])).stdout

    def digests(self, name: str) -> dict[str, str]:
        """Return the sha256 of every regular file below `name` (or of `name` itself), computed in the sandbox."""
        script = 'cd "$1" && find . -type f -exec sha256sum {} +'
        if not self.shell('[ -d "$1" ] && echo dir || true', self.in_sandbox(name)).strip():
            script = 'cd "$(dirname "$1")" && sha256sum "./$(basename "$1")"'
        digests = {}
        for line in self.shell(script, self.in_sandbox(name)).decode().splitlines():
            digest, path = line.split(maxsplit=1)
            digests[os.path.normpath(path)] = digest
        return digests

    def remove(self, name: str) -> None:
        self.shell('rm -rf -- "$1"', self.in_sandbox(name))

    def cleanup(self) -> None:
        """Unmount, then remove the container; the caller removes the temporary directories."""
        self.unmount()
        if self.container is not None and not self.removed:
            result = run(["docker", "rm", "-f", self.container], check=False)
            if result.returncode != 0:
                message = result.stderr.decode(errors="replace").strip()
                raise BenchError(f"docker rm -f {self.container} failed: {message}; remove it by hand")
            self.removed = True


# --- inputs -----------------------------------------------------------------


def make_large_file(path: str, mib: int) -> str:
    """Write `mib` MiB of random bytes to `path` and return their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as file:
        for _ in range(mib):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            file.write(chunk)
    return digest.hexdigest()


def make_small_tree(root: str, workload: Workload, seed: int = 1) -> set[str]:
    """Write text files of 1-4 KiB below `root`; return the relative paths of those that contain NEEDLE."""
    words = ["alpha", "beta", "gamma", "delta", "sandbox", "mount", "kernel", "inode", "cache", "agent"]
    generator = random.Random(seed)
    matches = set()
    for directory_index in range(workload.small_dirs):
        directory = os.path.join(root, f"dir{directory_index}")
        os.makedirs(directory)
        for file_index in range(workload.small_files_per_dir):
            size = generator.randint(1024, 4096)
            text = " ".join(generator.choice(words) for _ in range(size // 5))
            relative = os.path.join(f"dir{directory_index}", f"file{file_index}.txt")
            if file_index % 10 == 0:
                text = f"{NEEDLE}\n{text}"
                matches.add(relative)
            with open(os.path.join(root, relative), "w") as file:
                file.write(text[:size] + "\n")
    return matches


# Every file contains a short line, so that `ls -l` has sizes to show.
TREE_SCRIPT = """
cd "$1" && mkdir tree && cd tree || exit 1
i=0
while [ "$i" -lt "$2" ]; do
    mkdir "d$i" || exit 1
    j=0
    while [ "$j" -lt "$3" ]; do
        echo "entry $i $j" >"d$i/f$j" || exit 1
        j=$((j + 1))
    done
    i=$((i + 1))
done
"""


# --- measurements -----------------------------------------------------------


def list_long(path: str) -> list[str]:
    return ["ls", "-lR", path]


def find_long(path: str) -> list[str]:
    return ["find", path, "-ls"]


def measure(result: Result, repeat: int, through_mount: Callable[[int], float], baseline: Callable[[int], float]) -> Result:
    """Alternate `repeat` runs of the two sides, each of which returns its timed seconds."""
    for index in range(repeat):
        result.sandboxfs_seconds.append(through_mount(index))
        result.baseline_seconds.append(baseline(index))
    times = " ".join(f"{seconds:.3f}" for seconds in result.sandboxfs_seconds)
    baseline_times = " ".join(f"{seconds:.3f}" for seconds in result.baseline_seconds)
    logger.info("%s: %s: sandboxfs %s s; %s %s s", result.backend, result.operation, times, result.baseline, baseline_times)
    return result


class Bench:
    """The measurements of one backend."""

    def __init__(self, sandbox: Sandbox, workload: Workload, inputs: str, outputs: str, repeat: int) -> None:
        self.sandbox = sandbox
        self.workload = workload
        self.inputs = inputs
        self.outputs = outputs
        self.repeat = repeat

    def result(self, operation: str, baseline: str, size: int | None = None) -> Result:
        return Result(self.sandbox.kind, operation, baseline, size)

    def run_all(self) -> list[Result]:
        results = self.large_file()
        results += self.metadata()
        results += self.small_files()
        return results

    # Large file: cp into the mount and back out, against docker cp (or cp) in and out.

    def large_file(self) -> list[Result]:
        size = self.workload.large_mib << 20
        source = os.path.join(self.inputs, f"large-{self.workload.large_mib}MiB.bin")
        if not os.path.exists(source):
            make_large_file(source, self.workload.large_mib)
        expected = sha256_file(source)
        label = f"{self.workload.large_mib} MiB file"
        write = self.result(f"{label}: write (cp in)", f"{self.sandbox.copy_label} in", size)
        read = self.result(f"{label}: read (cp out)", f"{self.sandbox.copy_label} out", size)

        measure(write, self.repeat, lambda i: self.write_large(source, f"large-sbx-{i}", expected, True),
                lambda i: self.write_large(source, f"large-base-{i}", expected, False))
        self.write_large(source, "large", expected, False)
        self.sandbox.remount()
        measure(read, self.repeat, lambda i: self.read_large(f"large-sbx-{i}", expected, True),
                lambda i: self.read_large(f"large-base-{i}", expected, False))
        return [write, read]

    def write_large(self, source: str, name: str, expected: str, through_mount: bool) -> float:
        if through_mount:
            seconds, _ = timed(["cp", source, self.sandbox.in_mount(name)])
        else:
            seconds, _ = timed(self.sandbox.copy_in_argv(source, name))
        check_equal(f"{name} in the sandbox", self.sandbox.digests(name), {name: expected})
        if name != "large":
            self.sandbox.remove(name)
        return seconds

    def read_large(self, out_name: str, expected: str, through_mount: bool) -> float:
        target = os.path.join(self.outputs, out_name)
        if through_mount:
            self.sandbox.remount()
            seconds, _ = timed(["cp", self.sandbox.in_mount("large"), target])
        else:
            seconds, _ = timed(self.sandbox.copy_out_argv("large", target))
        check_equal(f"{out_name} copied out", sha256_file(target), expected)
        os.unlink(target)
        return seconds

    # Metadata: a listing with attributes of a tree made inside the sandbox.

    def metadata(self) -> list[Result]:
        workload = self.workload
        self.sandbox.shell(TREE_SCRIPT, self.sandbox.root, str(workload.tree_dirs), str(workload.tree_files_per_dir))
        entries = workload.tree_entries
        files = workload.tree_dirs * workload.tree_files_per_dir
        results = []

        ls = self.result(f"ls -lR, {entries} entries", self.sandbox.exec_label("ls -lR"))
        measure(ls, self.repeat, lambda i: self.list_tree(list_long, True, files),
                lambda i: self.list_tree(list_long, False, files))
        results.append(ls)

        if workload.find_ls:
            find = self.result(f"find -ls, {entries} entries", self.sandbox.exec_label("find -ls"))
            # find -ls prints one line for each entry and one for the tree itself.
            measure(find, self.repeat, lambda i: self.list_tree(find_long, True, entries + 1),
                    lambda i: self.list_tree(find_long, False, entries + 1))
            results.append(find)
        return results

    def list_tree(self, argv_for: Callable[[str], list[str]], through_mount: bool, expected_lines: int) -> float:
        """Time the listing `argv_for(tree)` and check how many lines it printed.

        `expected_lines` counts the lines of regular files for `ls -lR` (which
        also prints headers and totals), and every line for `find -ls`.
        """
        if through_mount:
            self.sandbox.remount()
            seconds, output = timed(argv_for(self.sandbox.in_mount("tree")))
        else:
            seconds, output = timed(self.sandbox.exec_argv(argv_for(self.sandbox.in_sandbox("tree"))))
        lines = output.decode(errors="replace").splitlines()
        if argv_for is list_long:
            lines = [line for line in lines if line.startswith("-")]
        check_equal("the number of lines the listing printed", len(lines), expected_lines)
        return seconds

    # Many small files: copy a tree in and out, and search it with grep -r.

    def small_files(self) -> list[Result]:
        workload = self.workload
        source = os.path.join(self.inputs, f"small-{workload.small_files}")
        matches = make_small_tree(source, workload)
        expected = host_digests(source)
        size = sum(os.path.getsize(os.path.join(source, path)) for path in expected)
        count = workload.small_files
        copy_in = self.result(f"{count} small files: cp -r in", f"{self.sandbox.copy_label} in", size)
        grep = self.result(f"{count} small files: grep -r", self.sandbox.exec_label("grep -r"))
        copy_out = self.result(f"{count} small files: cp -r out", f"{self.sandbox.copy_label} out", size)

        measure(copy_in, self.repeat, lambda i: self.copy_tree_in(source, f"small-sbx-{i}", expected, True),
                lambda i: self.copy_tree_in(source, f"small-base-{i}", expected, False))
        self.copy_tree_in(source, "small", expected, False)
        measure(grep, self.repeat, lambda i: self.grep_tree(matches, True), lambda i: self.grep_tree(matches, False))
        measure(copy_out, self.repeat, lambda i: self.copy_tree_out(f"small-sbx-{i}", expected, True),
                lambda i: self.copy_tree_out(f"small-base-{i}", expected, False))
        return [copy_in, grep, copy_out]

    def copy_tree_in(self, source: str, name: str, expected: dict[str, str], through_mount: bool) -> float:
        if through_mount:
            seconds, _ = timed(["cp", "-r", source, self.sandbox.in_mount(name)])
        else:
            seconds, _ = timed(self.sandbox.copy_in_argv(source, name))
        check_equal(f"the files of {name} in the sandbox", self.sandbox.digests(name), expected)
        if name != "small":
            self.sandbox.remove(name)
        return seconds

    def grep_tree(self, matches: set[str], through_mount: bool) -> float:
        if through_mount:
            self.sandbox.remount()
            root = self.sandbox.in_mount("small")
            seconds, output = timed(["grep", "-rl", NEEDLE, root])
        else:
            root = self.sandbox.in_sandbox("small")
            seconds, output = timed(self.sandbox.exec_argv(["grep", "-rl", NEEDLE, root]))
        found = {os.path.relpath(line, root) for line in output.decode().splitlines()}
        check_equal("the files grep -rl found", found, matches)
        return seconds

    def copy_tree_out(self, out_name: str, expected: dict[str, str], through_mount: bool) -> float:
        target = os.path.join(self.outputs, out_name)
        if through_mount:
            self.sandbox.remount()
            seconds, _ = timed(["cp", "-r", self.sandbox.in_mount("small"), target])
        else:
            seconds, _ = timed(self.sandbox.copy_out_argv("small", target))
        check_equal(f"the files of {out_name} copied out", host_digests(target), expected)
        shutil.rmtree(target)
        return seconds


# --- report -----------------------------------------------------------------

HEADERS = ("backend", "operation", "sandboxfs s", "baseline", "baseline s", "ratio", "sandboxfs MB/s", "baseline MB/s")


def rate(size: int | None, seconds: float) -> str:
    if size is None:
        return ""
    megabytes_per_second = size / seconds / 1e6
    return f"{megabytes_per_second:.1f}" if megabytes_per_second >= 1 else f"{megabytes_per_second:.2f}"


def table_rows(results: list[Result]) -> list[tuple[str, ...]]:
    return [
        (
            result.backend,
            result.operation,
            f"{result.sandboxfs_median:.3f}",
            result.baseline,
            f"{result.baseline_median:.3f}",
            f"{result.ratio:.1f}",
            rate(result.size, result.sandboxfs_median),
            rate(result.size, result.baseline_median),
        )
        for result in results
    ]


def format_table(results: list[Result], markdown: bool) -> str:
    rows = [HEADERS, *table_rows(results)]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "| " + " | ".join("---" for _ in HEADERS) + " |")
        return "\n".join(lines)
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADERS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def command_output(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def load_average() -> str:
    with open("/proc/loadavg") as file:
        return " ".join(file.read().split()[:3])


def machine_lines(repeat: int, load_before: str) -> list[str]:
    try:
        with open("/etc/debian_version") as file:
            system = f"Debian {file.read().strip()}"
    except OSError:
        system = platform.platform()
    commit = command_output(["git", "describe", "--always", "--dirty"])
    docker = command_output(["docker", "version", "--format", "{{.Server.Version}}"])
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {os.cpu_count()} CPUs, {system}, Linux {platform.release()}, Docker {docker}, Python {platform.python_version()}",
        f"sandboxfs: commit {commit}",
        f"load average (1, 5, 15 min): {load_before} before the run, {load_average()} after it",
        f"each time is the median of {repeat} runs; ratio = sandboxfs median / baseline median; MB = 10^6 bytes",
    ]


def print_report(results: list[Result], repeat: int, markdown: bool, load_before: str) -> None:
    print()
    for line in machine_lines(repeat, load_before):
        print(f"- {line}" if markdown else line)
    print()
    print(format_table(results, markdown))


# --- main -------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown, ready for docs/BENCHMARKS.md")
    parser.add_argument("--repeat", type=int, default=3, metavar="N", help="timed runs of each side per operation (default 3)")
    parser.add_argument(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="measure only this backend; repeat the option for more (default: all three)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def docker_ready(kinds: list[str]) -> bool:
    try:
        if run(["docker", "info"], check=False, timeout=30).returncode != 0:
            return False
        return all(run(["docker", "image", "inspect", IMAGES[kind]], check=False).returncode == 0 for kind in kinds)
    except (OSError, subprocess.TimeoutExpired):
        return False


def set_up_testbed(kinds: list[str]) -> None:
    """Run `scripts/testbed dockerd images` when `docker info` fails or a test image is missing."""
    docker_kinds = [kind for kind in kinds if kind in IMAGES]
    if not docker_kinds or docker_ready(docker_kinds):
        return
    logger.info("dockerd or a test image is missing; running scripts/testbed dockerd images")
    result = subprocess.run([TESTBED, "dockerd", "images"], stdout=sys.stderr)
    if result.returncode != 0:
        raise BenchError(f"scripts/testbed dockerd images failed with status {result.returncode}")


def bench_backend(kind: str, workdir: str, repeat: int, sandboxes: list[Sandbox]) -> list[Result]:
    sandbox = Sandbox(kind, workdir)
    sandboxes.append(sandbox)
    logger.info("%s: starting the sandbox and mounting it", kind)
    sandbox.start(workdir)
    sandbox.mount()
    inputs = tempfile.mkdtemp(prefix=f"inputs-{kind}-", dir=workdir)
    outputs = tempfile.mkdtemp(prefix=f"outputs-{kind}-", dir=workdir)
    started = time.monotonic()
    results = Bench(sandbox, WORKLOADS[kind], inputs, outputs, repeat).run_all()
    logger.info("%s: done in %.0f s", kind, time.monotonic() - started)
    sandbox.cleanup()
    return results


def cleanup(sandboxes: list[Sandbox], workdir: str | None) -> None:
    for sandbox in sandboxes:
        try:
            sandbox.cleanup()
        except (OSError, BenchError, subprocess.TimeoutExpired) as exc:
            logger.error("cleaning up %s failed: %s", sandbox.kind, exc)
    if workdir is None:
        return
    # Removing a directory that still has a mount below it would delete files in the sandbox.
    still_mounted = [sandbox.mountpoint for sandbox in sandboxes if is_mounted(sandbox.mountpoint)]
    if still_mounted:
        logger.error("not removing %s: %s is still mounted", workdir, ", ".join(still_mounted))
        return
    shutil.rmtree(workdir, ignore_errors=True)


def raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    kinds = [kind for kind in BACKENDS if args.backend is None or kind in args.backend]
    # A shell starts background jobs with SIGINT ignored, and Python then keeps
    # it ignored; the default handler makes SIGINT raise KeyboardInterrupt there too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)

    sandboxes: list[Sandbox] = []
    workdir = None
    results: list[Result] = []
    status = 0
    try:
        set_up_testbed(kinds)
        workdir = tempfile.mkdtemp(prefix="sbxbench-")
        started = time.monotonic()
        load_before = load_average()
        for kind in kinds:
            results += bench_backend(kind, workdir, args.repeat, sandboxes)
        logger.info("all backends done in %.0f s", time.monotonic() - started)
        print_report(results, args.repeat, args.markdown, load_before)
    except KeyboardInterrupt:
        logger.error("interrupted; cleaning up")
        status = 130
    except (BenchError, subprocess.TimeoutExpired) as exc:
        logger.error("%s", exc)
        status = 1
    finally:
        # A second Ctrl-C during the clean-up would leave mounts and containers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup(sandboxes, workdir)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
