"""Several processes using one mount at once, run on every backend.

Each helper runs in its own Python process (`python -c`), so the kernel gets
separate processes with their own descriptors, as with real programs.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys

import pytest

from conftest import Workdir

WRITERS = 4


def start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, timeout: float = 120) -> bytes:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr.decode(errors="replace")
    return stdout


def sandbox_sha256(workdir: Workdir, names: list[str]) -> dict[str, str]:
    paths = [f"{workdir.inside}/{name}" for name in names]
    output = workdir.sandbox.run('sha256sum -- "$@"', *paths).stdout.decode()
    digests = {}
    for line in output.splitlines():
        digest, path = line.split(None, 1)
        digests[path.lstrip("*").rsplit("/", 1)[1]] = digest
    return digests


# Writes SIZE bytes made from SEED to PATH in 64 KiB writes.
_WRITE_FILE = """
import random, sys
path, seed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(seed).randbytes(size)
with open(path, "wb") as file:
    for offset in range(0, size, 65536):
        file.write(data[offset : offset + 65536])
"""


def test_parallel_writers_keep_each_file(workdir):
    sizes = [300_000 + 7 * index for index in range(WRITERS)]
    names = [f"writer-{index}" for index in range(WRITERS)]
    writers = [
        start(_WRITE_FILE, os.path.join(workdir.mnt, name), str(index), str(size))
        for index, (name, size) in enumerate(zip(names, sizes))
    ]
    for writer in writers:
        finish(writer)

    expected = {
        name: hashlib.sha256(random.Random(index).randbytes(size)).hexdigest()
        for index, (name, size) in enumerate(zip(names, sizes))
    }
    assert sandbox_sha256(workdir, names) == expected


# Appends COUNT lines tagged TAG to PATH, each line with one write(2).
_APPEND_LINES = """
import os, sys
path, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
try:
    for index in range(count):
        line = f"{tag} {index:04d} " + tag * 40 + "\\n"
        assert os.write(fd, line.encode()) == len(line)
finally:
    os.close(fd)
"""


def test_two_appenders_keep_every_line(workdir):
    path = os.path.join(workdir.mnt, "shared.log")
    count = 60
    appenders = [start(_APPEND_LINES, path, tag, str(count)) for tag in ("A", "B")]
    for appender in appenders:
        finish(appender)

    lines = workdir.sandbox.read(f"{workdir.inside}/shared.log").decode().split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    expected = {f"{tag} {index:04d} " + tag * 40 for tag in ("A", "B") for index in range(count)}
    torn = [line for line in lines if line not in expected]
    assert torn == []
    assert len(lines) == len(expected)
    assert set(lines) == expected
    for tag in ("A", "B"):
        own = [line for line in lines if line.startswith(tag)]
        assert own == sorted(own), f"{tag}'s lines are out of order"


# Replaces PATH COUNT times by writing PATH.tmp and renaming it over PATH.
# Version N is "vN:LENGTH:" and then LENGTH bytes of one letter, so that a
# mix of versions or a short read cannot look whole.
_REPLACE = """
import os, sys
path, count = sys.argv[1], int(sys.argv[2])
for version in range(1, count + 1):
    body = bytes([ord("a") + version % 26]) * (1000 + 3000 * version)
    with open(path + ".tmp", "wb") as file:
        file.write(f"v{version}:{len(body)}:".encode() + body)
    os.replace(path + ".tmp", path)
"""

# Reads PATH, opening it anew each time, until STOP exists. Prints the
# number of reads, then one line per distinct outcome: "ok VERSION",
# "bad LENGTH PREFIX" for content that is not one whole version, or
# "error ERRNO" for a failed open or read.
_READ_LOOP = """
import errno, os, sys
path, stop = sys.argv[1], sys.argv[2]
seen = set()
reads = 0
while True:
    done = os.path.exists(stop)
    reads += 1
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        seen.add(f"error {errno.errorcode[exc.errno]}")
        if done:
            break
        continue
    header, _, body = data.partition(b":")
    length, _, body = body.partition(b":")
    version = header[1:].decode() if header.startswith(b"v") else ""
    whole = (
        version.isdigit()
        and length.isdigit()
        and len(body) == int(length)
        and body == bytes([ord("a") + int(version) % 26]) * int(length)
    )
    seen.add(f"ok {version}" if whole else f"bad {len(data)} {data[:40]!r}")
    if done:
        break
print(reads)
for line in sorted(seen):
    print(line)
"""


def test_reader_sees_whole_versions_during_replace(workdir, tmp_path):
    path = os.path.join(workdir.mnt, "config")
    with open(path, "wb") as file:
        file.write(b"v0:4:aaaa")
    stop = tmp_path / "stop"
    count = 5

    reader = start(_READ_LOOP, path, str(stop))
    writer = start(_REPLACE, path, str(count))
    finish(writer)
    stop.touch()
    output = finish(reader).decode().splitlines()

    reads, seen = int(output[0]), output[1:]
    torn = [line for line in seen if line.startswith("bad ")]
    assert torn == []
    # An open that races with the rename gets ESTALE inside the kernel, which
    # looks the name up again, and an open file keeps its content under a
    # hidden name: no read fails.
    failed = [line for line in seen if line.startswith("error ")]
    assert failed == []
    assert any(line.startswith("ok ") for line in seen), seen
    assert reads >= 2
    with open(path, "rb") as file:
        last = file.read()
    assert last.startswith(f"v{count}:".encode())
    assert workdir.sandbox.read(f"{workdir.inside}/config") == last


def test_open_handle_reads_old_content_after_replace(workdir):
    path = os.path.join(workdir.mnt, "config")
    with open(path, "wb") as file:
        file.write(b"old content")
    fd = os.open(path, os.O_RDONLY)
    try:
        with open(path + ".tmp", "wb") as file:
            file.write(b"new content, longer")
        os.replace(path + ".tmp", path)
        # The kernel's page cache may hold the old pages; drop it to ask the mount.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 100, 0) == b"old content"
    finally:
        os.close(fd)
    with open(path, "rb") as file:
        assert file.read() == b"new content, longer"


def test_two_handles_keep_both_writes(workdir):
    original = bytes(range(256)) * 40
    workdir.sandbox.write(f"{workdir.inside}/two", original)
    path = os.path.join(workdir.mnt, "two")

    first = os.open(path, os.O_WRONLY)
    second = os.open(path, os.O_RDWR)
    try:
        os.pwrite(first, b"FIRST", 100)
        os.pwrite(second, b"SECOND", 9000)
        # The second handle reads the first one's write before either closes.
        assert os.pread(second, 5, 100) == b"FIRST"
    finally:
        os.close(first)
        os.close(second)

    expected = bytearray(original)
    expected[100:105] = b"FIRST"
    expected[9000:9006] = b"SECOND"
    assert workdir.sandbox.read(f"{workdir.inside}/two") == bytes(expected)
    with open(path, "rb") as file:
        assert file.read() == bytes(expected)
