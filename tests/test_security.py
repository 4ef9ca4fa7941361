"""Security through a real mount, written once and run on every backend.

Names that carry shell and protocol metacharacters must reach the sandbox as
plain bytes. The mount must not lead to files outside the sandbox root, and it
is its mounting user's alone. Its log must not contain file contents or the
mount process's environment.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, Mount, Workdir

# Only an injected command creates a file with this name: no test writes it.
CANARY = f"sbxcanary{uuid.uuid4().hex[:8]}"

# Each payload creates CANARY in the working directory of whatever shell
# would run it, if a name were ever pasted into command text.
PAYLOADS = [
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f";touch {CANARY};",
    f"|touch {CANARY}|",
    f"&touch {CANARY}&",
    f"\ntouch {CANARY}\n",
    f"'$(touch {CANARY})'",
    f'"$(touch {CANARY})"',
    f"';touch {CANARY};'",
    f'";touch {CANARY};"',
]

def _padded(prefix: str) -> str:
    """Return `prefix` padded with two-byte characters to exactly 255 bytes."""
    room = 255 - len(prefix.encode("utf-8"))
    return prefix + "é" * (room // 2) + "x" * (room % 2)


# Each name packs several cases, because on the shell fallback every name costs
# about twenty commands, each 50-150 ms on the test bed (measured with
# --durations), and the busybox backends must stay within the CI budget.
HOSTILE_NAMES: list[str | bytes] = [
    # A leading dash, then each shell metacharacter, newline and tab.
    f"-rf $(touch {CANARY});`touch {CANARY}`|touch {CANARY}&'\"\\\n\t*?[a]{{a,b}}~<>!#",
    f"--help ';touch {CANARY};' \";touch {CANARY};\" \\$(touch {CANARY}) %s %b \\c \\0101",
    "...",
    f"  é ☃ 名前 \u200b '$(touch {CANARY})'  ",
    _padded(f"$(touch {CANARY}) "),
    b"\xff\xfe-\\c\\0101%b`touch " + CANARY.encode() + b"`\x80\x01\n",
]

# Names the kernel passes: any bytes but NUL and "/". NUL ends a C string and
# "/" separates components, so neither can be tested through a mount.
METACHARACTERS = "$`;|&'\"\\\n\t *?[]{}()<>!#~=%-. é\x01\x7f"


def path_bytes(directory: str, *names: str | bytes) -> bytes:
    return os.path.join(os.fsencode(directory), *(os.fsencode(name) for name in names))


def content_for(name: str | bytes) -> bytes:
    return b"content of " + os.fsencode(name) + b"\n"


def errno_of(call, *args) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


# Inside the sandbox.

# Prints, for each entry below $2 (depth first): "d" or "f", its path relative
# to $2 and a NUL; for a file, then its size on one line and its bytes. Then
# "=" and the names equal to $1 in the directories after $2 and where a shell
# in the sandbox runs: /, $HOME, /tmp and $PWD. Names travel as arguments and
# glob results, never as script text.
_SNAPSHOT = r"""
walk() {
  for p in "$1"/* "$1"/.[!.]* "$1"/..?*; do
    [ -e "$p" ] || [ -L "$p" ] || continue
    if [ -d "$p" ] && ! [ -L "$p" ]; then
      printf 'd%s\0' "${p#"$root"/}"
      walk "$p"
    else
      printf 'f%s\0' "${p#"$root"/}"
      wc -c < "$p"
      cat < "$p"
    fi
  done
}
canary=$1
root=$2
walk "$root"
printf =
shift
for d in "$@" / "${HOME:-/}" /tmp "$PWD"; do
  ls -a -- "$d" 2>/dev/null
done | grep -x -F -- "$canary"
true
"""


def snapshot(workdir: Workdir) -> dict[bytes, bytes | None]:
    """Return {path below workdir: content, or None for a directory}.

    Fails if a file named CANARY exists below workdir or in the places an
    injected command would have run.
    """
    places = [workdir.inside, workdir.sandbox.root]
    if workdir.sandbox.prefix is None:
        # The local backend's agent runs on the host, in the mount process's
        # working directory: the repository, where the tests start it.
        places.append(REPO)
    output = workdir.sandbox.run(_SNAPSHOT, CANARY, *places).stdout
    entries: dict[bytes, bytes | None] = {}
    position = 0
    while output[position : position + 1] != b"=":
        end = output.index(b"\0", position)
        kind, path = output[position : position + 1], output[position + 1 : end]
        position = end + 1
        if kind == b"d":
            entries[path] = None
            continue
        line_end = output.index(b"\n", position)
        size = int(output[position:line_end])
        entries[path] = output[line_end + 1 : line_end + 1 + size]
        position = line_end + 1 + size

    found = output[position + 1 :]
    assert found == b"", f"an injected command ran in {workdir.sandbox.kind}: {found!r}"
    below = [path for path in entries if os.path.basename(path) == CANARY.encode()]
    assert below == [], f"an injected command ran in {workdir.sandbox.kind}: {below!r}"
    return entries


# Names.


def round_trip_names(workdir: Workdir, names: list[str | bytes]) -> None:
    """Create, read, list, rename and delete a directory and a file per name.

    Each name is a directory NAME holding a file NAME. Both are moved (the
    directory to moved/NAME, the file to files/NAME) and then removed. The
    sandbox's own view is checked after the creation and after the removal.
    """
    os.mkdir(os.path.join(workdir.mnt, "moved"))
    os.mkdir(os.path.join(workdir.mnt, "files"))
    for name in names:
        os.mkdir(path_bytes(workdir.mnt, name))
        with open(path_bytes(workdir.mnt, name, name), "wb") as file:
            file.write(content_for(name))

    listing = set(os.listdir(os.fsencode(workdir.mnt)))
    assert listing == {os.fsencode(name) for name in names} | {b"moved", b"files"}
    for name in names:
        with open(path_bytes(workdir.mnt, name, name), "rb") as file:
            assert file.read() == content_for(name)
    expected: dict[bytes, bytes | None] = {b"moved": None, b"files": None}
    for name in names:
        raw = os.fsencode(name)
        expected[raw] = None
        expected[raw + b"/" + raw] = content_for(name)
    assert snapshot(workdir) == expected

    for name in names:
        os.rename(path_bytes(workdir.mnt, name), path_bytes(workdir.mnt, "moved", name))
        os.rename(path_bytes(workdir.mnt, "moved", name, name), path_bytes(workdir.mnt, "files", name))
    assert set(os.listdir(path_bytes(workdir.mnt, "files"))) == {os.fsencode(name) for name in names}
    for name in names:
        os.unlink(path_bytes(workdir.mnt, "files", name))
        os.rmdir(path_bytes(workdir.mnt, "moved", name))
    assert snapshot(workdir) == {b"moved": None, b"files": None}


def round_trip_files(workdir: Workdir, names: list[bytes]) -> None:
    """Create, read, list, rename and delete a file per name; check the sandbox once."""
    os.mkdir(os.path.join(workdir.mnt, "moved"))
    for name in names:
        with open(path_bytes(workdir.mnt, name), "wb") as file:
            file.write(content_for(name))
    assert set(os.listdir(os.fsencode(workdir.mnt))) == set(names) | {b"moved"}
    for name in names:
        with open(path_bytes(workdir.mnt, name), "rb") as file:
            assert file.read() == content_for(name)
        os.rename(path_bytes(workdir.mnt, name), path_bytes(workdir.mnt, "moved", name))

    expected: dict[bytes, bytes | None] = {b"moved": None}
    for name in names:
        expected[b"moved/" + name] = content_for(name)
    assert snapshot(workdir) == expected
    for name in names:
        os.unlink(path_bytes(workdir.mnt, "moved", name))
    assert os.listdir(path_bytes(workdir.mnt, "moved")) == []


def test_hostile_names_reach_sandbox_unchanged(workdir):
    round_trip_names(workdir, HOSTILE_NAMES)


def _fuzzed_name(parts: tuple[str, str, str]) -> bytes:
    # Trimmed to NAME_MAX bytes; a cut UTF-8 sequence is a non-UTF-8 name.
    return "".join(parts).encode("utf-8")[:255]


fuzzed_names = st.tuples(
    st.text(alphabet=METACHARACTERS, max_size=12),
    st.sampled_from(PAYLOADS),
    st.text(alphabet=METACHARACTERS, max_size=12),
).map(_fuzzed_name).filter(lambda name: name not in (b".", b".."))


@settings(
    max_examples=2,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(names=st.lists(fuzzed_names, min_size=2, max_size=2, unique=True))
def test_fuzzed_names_reach_sandbox_unchanged(workdir, names):
    # Each example works in its own directory, so examples do not interfere.
    example = f"ex-{uuid.uuid4().hex[:8]}"
    workdir.sandbox.run('mkdir -m 777 -- "$1"', f"{workdir.inside}/{example}")
    inner = Workdir(workdir.sandbox, workdir.mount, os.path.relpath(os.path.join(workdir.mnt, example), workdir.mount.path))
    round_trip_files(inner, names)


def test_overlong_names_are_rejected(workdir):
    open(os.path.join(workdir.mnt, "short"), "wb").close()
    # 256 bytes: 256 ASCII characters, or 128 two-byte UTF-8 characters.
    for name in ("y" * 256, "é" * 128, b"\xff" * 256):
        path = path_bytes(workdir.mnt, name)
        assert errno_of(os.mkdir, path) == errno.ENAMETOOLONG
        assert errno_of(os.open, path, os.O_CREAT | os.O_WRONLY, 0o644) == errno.ENAMETOOLONG
        assert errno_of(os.symlink, b"short", path) == errno.ENAMETOOLONG
        assert errno_of(os.rename, path_bytes(workdir.mnt, "short"), path) == errno.ENAMETOOLONG
    assert snapshot(workdir) == {b"short": b""}


# Containment.


def test_mount_root_parent_is_host_directory(mounts, backend_kind):
    _, mount = mounts(backend_kind)
    parent = os.stat(os.path.dirname(mount.path))
    through_mount = os.stat(os.path.join(mount.path, ".."))
    assert (through_mount.st_dev, through_mount.st_ino) == (parent.st_dev, parent.st_ino)
    assert os.path.basename(mount.path) in os.listdir(os.path.join(mount.path, ".."))
    assert os.path.realpath(os.path.join(mount.path, "..", "..")) == os.path.dirname(os.path.dirname(mount.path))


def assert_not_reachable(path: str) -> None:
    """Check that `path` through the mount cannot be opened."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return
    raise AssertionError(f"{path} opened and read {data[:60]!r}")


def outside_directory(workdir: Workdir) -> str:
    """Return a new path outside the sandbox root that the backend can reach too."""
    base = "/tmp"
    if workdir.sandbox.kind.startswith("condor"):
        # HTCondor gives a job a private /tmp, so `Sandbox.run`, which runs
        # beside the job, would write another /tmp than the job uses.
        base = workdir.sandbox.run('printf %s "$HOME"').stdout.decode()
    return f"{base}/sbx-outside-{uuid.uuid4().hex[:8]}"


def test_symlink_chain_leaving_root_is_not_followed(workdir):
    outside_dir = outside_directory(workdir)
    # a -> b -> c/ -> a relative climb out of the root to outside_dir;
    # deep/er/x -> /etc; deep/er/up -> ten levels up; passwd -> through up.
    workdir.sandbox.run(
        'mkdir -p -- "$2" && printf outside > "$2/secret" && cd -- "$1" && ln -s b a && ln -s c/ b '
        '&& ln -s "$3" c && mkdir -p deep/er && ln -s /etc deep/er/x '
        "&& ln -s ../../../../../../../../../.. deep/er/up && ln -s deep/er/up/etc/passwd passwd",
        workdir.inside,
        outside_dir,
        "../" * (workdir.inside.count("/") + 2) + outside_dir.lstrip("/"),
    )
    try:
        assert os.readlink(os.path.join(workdir.mnt, "a")) == "b"
        for name in ("c", "deep/er/x", "deep/er/up"):
            assert errno_of(os.readlink, os.path.join(workdir.mnt, name)) == errno.EPERM
        assert_not_reachable(os.path.join(workdir.mnt, "a", "secret"))
        assert_not_reachable(os.path.join(workdir.mnt, "deep", "er", "x", "passwd"))
        assert_not_reachable(os.path.join(workdir.mnt, "passwd"))
        # realpath raises where readlink gives EPERM: the chain resolves nowhere.
        with pytest.raises(OSError):
            os.path.realpath(os.path.join(workdir.mnt, "a"))
    finally:
        workdir.sandbox.run('rm -rf -- "$1"', outside_dir)


def test_directory_replaced_by_symlink_is_not_followed(workdir):
    outside_dir = outside_directory(workdir)
    workdir.sandbox.run('mkdir -p -- "$1" && printf outside > "$1/secret"', outside_dir)
    try:
        os.mkdir(os.path.join(workdir.mnt, "d"))
        assert os.listdir(os.path.join(workdir.mnt, "d")) == []
        # Within the entry timeout the kernel keeps "d" as the directory it saw.
        workdir.sandbox.run('rmdir -- "$1/d" && ln -s "$2" "$1/d"', workdir.inside, outside_dir)
        assert_not_reachable(os.path.join(workdir.mnt, "d", "secret"))
    finally:
        workdir.sandbox.run('rm -rf -- "$1"', outside_dir)


def test_symlink_replaced_by_directory_is_followed_inside(workdir):
    workdir.sandbox.run('ln -s /etc "$1/s"', workdir.inside)
    assert errno_of(os.readlink, os.path.join(workdir.mnt, "s")) == errno.EPERM
    workdir.sandbox.run('rm -- "$1/s" && mkdir "$1/s" && printf inside > "$1/s/passwd"', workdir.inside)
    # The kernel keeps the symlink's entry for up to the entry timeout.
    subprocess.run(["sleep", "1.2"], check=True)
    assert stat.S_ISDIR(os.lstat(os.path.join(workdir.mnt, "s")).st_mode)
    with open(os.path.join(workdir.mnt, "s", "passwd"), "rb") as file:
        assert file.read() == b"inside"


def test_outside_hard_link_is_plain_file(workdir):
    outside = outside_directory(workdir)
    made = workdir.sandbox.run(
        'printf shared > "$1" && ln -- "$1" "$2/hard"', outside, workdir.inside, check=False
    )
    try:
        if made.returncode != 0:
            # The sandbox's own rules forbid it, typically across a bind mount.
            assert made.stderr.strip(), "ln failed without a message"
            assert not os.path.lexists(os.path.join(workdir.mnt, "hard"))
            return
        path = os.path.join(workdir.mnt, "hard")
        info = os.lstat(path)
        assert stat.S_ISREG(info.st_mode)
        assert info.st_nlink == 2
        with open(path, "rb") as file:
            assert file.read() == b"shared"
        # A hard link is the same file, not a path: writing it is writing
        # that inode, and no other name outside the root appears.
        with open(path, "wb") as file:
            file.write(b"rewritten")
        assert workdir.sandbox.read(outside) == b"rewritten"
        assert os.listdir(workdir.mnt) == ["hard"]
    finally:
        workdir.sandbox.run('rm -f -- "$1"', outside)


# Access by other users.

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run_as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True)


@pytest.fixture(scope="module")
def debug_mounts(mounts):
    """A second mount per backend with --debug and --allow-other, made on first use.

    The mount process's environment contains SANDBOXFS_TEST_SECRET, whose
    value must never appear in its log.
    """
    made: dict[str, tuple[Mount, str]] = {}

    def get(kind: str) -> tuple[Mount, str]:
        if kind not in made:
            sandbox, _ = mounts(kind)
            secret = f"envsecret-{uuid.uuid4().hex}"
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("SANDBOXFS_TEST_SECRET", secret)
                mount = Mount(sandbox.source, *sandbox.mount_options, "--debug", "--allow-other")
            made[kind] = (mount, secret)
        return made[kind]

    yield get
    for mount, _ in made.values():
        mount.close()


@pytest.fixture
def as_root():
    if os.geteuid() != 0:
        pytest.skip("setpriv needs root to switch to another uid")


def test_other_user_gets_eacces(workdir, as_root):
    result = run_as_nobody("ls", workdir.mount.path)
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    result = run_as_nobody("stat", "--", workdir.mnt)
    assert result.returncode != 0
    assert "Permission denied" in result.stderr


def test_other_user_allowed_with_allow_other(workdir, debug_mounts, as_root):
    mount, _ = debug_mounts(workdir.sandbox.kind)
    # Past the FUSE check, the kernel applies the mode bits (default_permissions)
    # and the sandbox root may be closed to others, so only the root is stat'ed.
    result = run_as_nobody("stat", "-c", "%a", "--", mount.path)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout, 8) == stat.S_IMODE(os.stat(mount.path).st_mode)


# Logs.


def test_debug_log_holds_no_secrets(workdir, debug_mounts):
    mount, env_secret = debug_mounts(workdir.sandbox.kind)
    token = f"filesecret-{uuid.uuid4().hex}"
    through = os.path.join(mount.path, os.path.relpath(workdir.mnt, workdir.mount.path))
    path = os.path.join(through, "notes.txt")

    with open(path, "w") as file:
        file.write(f"password={token}\n")
    with open(path) as file:
        assert file.read() == f"password={token}\n"
    os.rename(path, os.path.join(through, "renamed.txt"))
    assert workdir.sandbox.read(f"{workdir.inside}/renamed.txt") == f"password={token}\n".encode()

    log = mount.log()
    # libfuse's debug trace names each request, so the log covers the writes.
    assert "opcode: WRITE" in log
    assert "opcode: RENAME" in log
    assert token not in log
    assert env_secret not in log
