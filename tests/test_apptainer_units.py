"""Tests of the process transport and the Apptainer backend that need no Apptainer.

A fake `apptainer` script mimics `apptainer exec instance://NAME CMD...` by
running CMD on the host, and fails for unknown instances with Apptainer 1.4's
own message. A fake `ssh` script mimics what sshd does with a command: it
joins the words after the destination with spaces and hands the string to
`sh -c`, so the quoting of remote commands is exercised by a real shell.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import trio

from conftest import Mount, sandboxfs
from sandboxfs.backend import BackendError, ConnectError
from sandboxfs.backends import open_backend
from sandboxfs.backends.apptainer import connect_apptainer
from sandboxfs.backends.process import (
    CommandPrefix,
    ProcessRunner,
    SshConnection,
    connect_process,
    quote_argument,
    remote_command,
    ssh_prefix,
)
from sandboxfs.remote import AgentBackend
from sandboxfs.backends.shell import ShellBackend
from sandboxfs.sources import HostCommands, Source, SourceError, SshTarget, parse_source

# Arguments that a shell would split, expand or read as options if they were
# pasted into a command unquoted.
HOSTILE = [
    "two words",
    "it's",
    '"double"',
    "new\nline",
    "trailing newline\n",
    "$(touch pwned)",
    "`touch pwned`",
    "${HOME}",
    "-n",
    "--",
    "-oProxyCommand=touch pwned",
    "*",
    "~",
    "",
    "back\\slash",
    "tab\there",
    "semi;colon|pipe&amp<in>out",
    "!bang",
    os.fsdecode(b"latin1 \xe9\xff"),
    b"raw bytes \xfe\n'",
]

# Apptainer 1.4's message for `apptainer exec instance://NAME` when no such
# instance runs (launcher setImageOrInstance, then sylog.Fatalf, exit 255).
INSTANCE_NOT_FOUND = "FATAL:   While setting image/instance: no instance found with name"

FAKE_APPTAINER = textwrap.dedent(
    f"""\
    #!/bin/sh
    [ "$1" = exec ] || {{ echo "FATAL:   unknown command $1" >&2; exit 255; }}
    case $2 in
      instance://box) ;;
      *) echo "{INSTANCE_NOT_FOUND} ${{2#instance://}}" >&2; exit 255 ;;
    esac
    shift 2
    exec "$@"
    """
)

# The same, for an instance without python3.
# NOTE: the message is a guess at Apptainer 1.4's text for a missing program.
# The backend relies only on the probe failing, not on this text.
FAKE_APPTAINER_NO_PYTHON = FAKE_APPTAINER.replace(
    "shift 2\n",
    'shift 2\ncase $1 in python3*) echo "FATAL:   \\"$1\\": executable file not found in \\$PATH" >&2; exit 255 ;; esac\n',
)

FAKE_SSH = textwrap.dedent(
    """\
    #!/bin/sh
    # Skip ssh's options up to "--", then the destination, as ssh does.
    while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
      [ "$1" = -O ] && exit 0
      shift
    done
    shift 2
    # A word that escaped its quotes would create files here, not in the
    # caller's directory.
    cd "$(dirname "$0")/scratch" || exit 1
    exec sh -c "$*"
    """
)


def write_script(path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def fake_apptainer(tmp_path) -> str:
    return write_script(tmp_path / "apptainer", FAKE_APPTAINER)


@pytest.fixture
def fake_ssh(tmp_path) -> str:
    (tmp_path / "scratch").mkdir()
    return write_script(tmp_path / "ssh", FAKE_SSH)


@pytest.fixture
def root(tmp_path) -> str:
    directory = tmp_path / "root"
    directory.mkdir()
    (directory / "hello.txt").write_bytes(b"hello\n")
    return str(directory)


def run_backend(connect, test):
    """Run `await test(backend)` on the backend that `await connect(nursery)` returns."""

    async def main():
        async with trio.open_nursery() as nursery:
            backend = await connect(nursery)
            try:
                with trio.fail_after(60):
                    await test(backend)
            finally:
                await backend.aclose()

    trio.run(main)


def connect_error(connect) -> str:
    """Return the message of the ConnectError that `await connect(nursery)` raises."""

    async def main():
        async with trio.open_nursery() as nursery:
            with trio.fail_after(60):
                with pytest.raises(ConnectError) as info:
                    await connect(nursery)
        return str(info.value)

    message = trio.run(main)
    assert "\n" not in message
    return message


async def round_trip_hostile_names(backend, root: str) -> None:
    """Create, list, read and remove files with hostile names in `root`."""
    names = [os.fsdecode(os.fsencode(name)) for name in HOSTILE if name and "/" not in os.fsdecode(name)]
    names = [name for name in names if name not in (".", "..")]
    for index, name in enumerate(names):
        await backend.write_file(f"{root}/{name}", f"content {index}".encode())
    listed = {entry for entry, _ in await backend.list_dir(root)}
    assert set(names) <= listed
    for index, name in enumerate(names):
        assert await backend.read_file(f"{root}/{name}") == f"content {index}".encode()
        await backend.unlink(f"{root}/{name}")


# Sources.


@pytest.mark.parametrize(
    "text, target, root, via",
    [
        ("apptainer://box", "box", "/", None),
        ("apptainer://box:/work/dir/", "box", "/work/dir", None),
        ("apptainer://my_box.2-a", "my_box.2-a", "/", None),
        ("apptainer://box:/w?via=ssh://alice@host.example:2222", "box", "/w", SshTarget("host.example", "alice", 2222)),
        ("apptainer://box?via=ssh://10.0.0.7", "box", "/", SshTarget("10.0.0.7")),
        ("apptainer://box:/w?via=ssh://login-node", "box", "/w", SshTarget("login-node")),
    ],
)
def test_parse_apptainer_source(text, target, root, via):
    source = parse_source(text)
    assert source.scheme == "apptainer"
    assert source.target == target
    assert source.root == root
    assert source.via == via
    assert parse_source(str(source)) == source


def test_apptainer_source_text_round_trips():
    text = "apptainer://box:/w?via=ssh://alice@host:2222"
    assert str(parse_source(text)) == text


@pytest.mark.parametrize(
    "text, message",
    [
        ("apptainer://-box", "invalid instance name '-box'"),
        ("apptainer://two words", "invalid instance name 'two words'"),
        ("apptainer://..:/w", "invalid instance name '..'"),
        ("apptainer://:/w", "invalid instance name ''"),
        ("apptainer://box$(id)", "invalid instance name 'box$(id)'"),
        ("apptainer://box:relative", "invalid directory 'relative'"),
        ("apptainer://box:/a/../b", "invalid directory '/a/../b'"),
        ("apptainer://box?via=ssh://-oProxyCommand=touch_x", "invalid ssh host '-oProxyCommand=touch_x'"),
        ("apptainer://box?via=ssh://-oProxyCommand=x@host", "invalid ssh user '-oProxyCommand=x'"),
        ("apptainer://box?via=ssh://[::1]:22", "invalid ssh host '['"),
        ("apptainer://box?via=ssh://alice@host name", "invalid ssh host 'host name'"),
        ("apptainer://box?via=ssh://al ice@host", "invalid ssh user 'al ice'"),
        ("apptainer://box?via=ssh://host:0", "invalid ssh port '0'"),
        ("apptainer://box?via=ssh://host:65536", "invalid ssh port '65536'"),
        ("apptainer://box?via=ssh://host:22x", "invalid ssh port '22x'"),
        ("apptainer://box?via=ssh://host:", "invalid ssh port ''"),
        ("apptainer://box?via=ssh://", "invalid ssh host ''"),
        ("apptainer://box?via=http://host", "invalid via 'http://host'"),
        ("apptainer://box?user=alice", "invalid option 'user=alice'"),
    ],
)
def test_parse_apptainer_source_rejects(text, message):
    with pytest.raises(SourceError) as info:
        parse_source(text)
    assert str(info.value).startswith(message), str(info.value)
    assert repr(text) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text",
    ["docker://box", "docker://alice@box:/workspace", "docker://1000:1000@box:/w", "local:///srv/data"],
)
def test_docker_and_local_sources_still_parse(text):
    assert str(parse_source(text)) == text


def test_unknown_scheme_message_lists_apptainer():
    with pytest.raises(SourceError, match="apptainer://INSTANCE:/dir"):
        parse_source("podman://box")


def test_source_commands_not_part_of_name():
    source = parse_source("apptainer://box:/w")
    changed = Source(**{**source.__dict__, "commands": HostCommands("/opt/apptainer", ("ssh", "-v"))})
    assert changed == source
    assert str(changed) == "apptainer://box:/w"


# Quoting for ssh.


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_remote_command_round_trips_through_shell(shell, tmp_path):
    command = remote_command(["printf", "%s\\0", *HOSTILE])
    result = subprocess.run([shell, "-c", command], capture_output=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(b"\0")[:-1] == [os.fsencode(word) for word in HOSTILE]
    assert os.listdir(tmp_path) == []


def test_remote_command_runs_nothing_it_quotes(tmp_path):
    command = remote_command(["true", *HOSTILE])
    subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True)
    assert os.listdir(tmp_path) == []


def test_quote_argument_leaves_safe_words_bare():
    assert quote_argument("instance://box") == b"instance://box"
    assert quote_argument("-I") == b"-I"
    assert quote_argument("two words") == b"'two words'"
    assert quote_argument("it's") == b"'it'\"'\"'s'"
    assert quote_argument("") == b"''"


def test_quote_argument_rejects_nul():
    with pytest.raises(ValueError, match="NUL"):
        quote_argument("a\0b")


def test_agent_bootstrap_quotes_to_one_line():
    from sandboxfs.remote import agent_command

    command = remote_command(["apptainer", "exec", "instance://box", *agent_command()])
    assert b"\n" not in command


def test_ssh_prefix_shape():
    argv = ssh_prefix("alice@host", 2222, ["ssh", "-i", "key"], "/run/x/control")
    assert argv[:3] == ["ssh", "-i", "key"]
    assert argv[-2:] == ["--", "alice@host"]
    assert "BatchMode=yes" in argv
    assert "ControlPath=/run/x/control" in argv
    assert argv[argv.index("-p") + 1] == "2222"
    assert "-p" not in ssh_prefix("host", None, ["ssh"], "/c")


@pytest.mark.parametrize("destination", ["-oProxyCommand=x", "alice@-host", "-l@host", "host name", "[::1]"])
def test_ssh_prefix_rejects_option_injection(destination):
    with pytest.raises(SourceError) as info:
        ssh_prefix(destination, None, ["ssh"], "/c")
    assert "invalid ssh" in str(info.value)


@pytest.mark.parametrize(
    "stderr, expected",
    [
        (
            b"alice@127.0.0.1: Permission denied (publickey).\r\n",
            "ssh to alice@h:2222 failed: alice@127.0.0.1: Permission denied (publickey): check your ssh key and config",
        ),
        (
            b"ssh: connect to host 127.0.0.1 port 2222: Connection refused\r\n",
            "ssh to alice@h:2222 failed: ssh: connect to host 127.0.0.1 port 2222: Connection refused: "
            "check that sshd runs on that host and port",
        ),
        (
            b"No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\r\n"
            b"Host key verification failed.\r\n",
            "ssh to alice@h:2222 failed: Host key verification failed: add the host's key to known_hosts",
        ),
    ],
)
def test_ssh_diagnose_messages(stderr, expected):
    connection = SshConnection("h", "alice", 2222)
    try:
        message = connection.diagnose(255, stderr)
    finally:
        trio.run(connection.aclose)
    assert message is not None
    assert message.startswith(expected), message


def test_ssh_diagnose_leaves_other_failures():
    connection = SshConnection("h")
    try:
        assert connection.diagnose(1, b"cat: x: No such file or directory\n") is None
        assert connection.diagnose(255, b"FATAL:   something in apptainer\n") is None
    finally:
        trio.run(connection.aclose)


# The process transport.


def test_connect_process_runs_agent_through_prefix(root):
    async def connect(nursery):
        return await connect_process(nursery, ["env"], root, "test directory", python=sys.executable)

    async def check(backend):
        assert isinstance(backend, AgentBackend)
        assert await backend.read_file(f"{root}/hello.txt") == b"hello\n"
        await round_trip_hostile_names(backend, root)

    run_backend(connect, check)


def test_connect_process_reaps_agent(root):
    async def main():
        async with trio.open_nursery() as nursery:
            backend = await connect_process(nursery, ["env"], root, "test directory", python=sys.executable)
            pid = backend.hello_info["pid"]
            await backend.aclose()
        return pid

    pid = trio.run(main)
    assert not os.path.exists(f"/proc/{pid}")


def test_connect_process_reports_agent_stderr(root):
    # `env` exits 127 with its own message when the interpreter is missing.
    message = connect_error(
        lambda nursery: connect_process(nursery, ["env"], root, "test directory", python="/nonexistent/python3")
    )
    assert "agent did not start" in message
    assert "/nonexistent/python3" in message


def test_connect_process_missing_prefix_command(root):
    prefix = CommandPrefix(["/nonexistent/tool", "exec"], missing_hint="install the tool")
    message = connect_error(lambda nursery: connect_process(nursery, prefix, root, "test directory"))
    assert message == "/nonexistent/tool: command not found: install the tool"


def test_process_runner_returns_status_and_output():
    runner = ProcessRunner(["env"])
    status, stdout, stderr = trio.run(runner, ["sh", "-c", 'cat; printf "%s" "$1" >&2; exit 3', "sh", "arg"], b"input")
    assert (status, stdout, stderr) == (3, b"input", b"arg")


def test_process_runner_route_failure_is_unavailable():
    runner = ProcessRunner(["env"], diagnose=lambda status, stderr: "route down" if status == 9 else None)
    with pytest.raises(BackendError) as info:
        trio.run(runner, ["sh", "-c", "exit 9"], None)
    assert info.value.code == "unavailable"
    assert info.value.message == "route down"


def test_process_runner_missing_command_is_unavailable():
    runner = ProcessRunner(CommandPrefix(["/nonexistent/tool"], missing_hint="install it"))
    with pytest.raises(BackendError) as info:
        trio.run(runner, ["true"], None)
    assert info.value.code == "unavailable"
    assert "/nonexistent/tool: command not found" in info.value.message


# The Apptainer backend against the fake apptainer.


def test_apptainer_agent_path(fake_apptainer, root):
    async def connect(nursery):
        return await connect_apptainer(nursery, "box", root, apptainer=fake_apptainer, python=sys.executable)

    async def check(backend):
        assert isinstance(backend, AgentBackend)
        assert await backend.read_file(f"{root}/hello.txt") == b"hello\n"
        await round_trip_hostile_names(backend, root)

    run_backend(connect, check)


def test_apptainer_shell_fallback_without_python(fake_apptainer, root):
    async def connect(nursery):
        return await connect_apptainer(nursery, "box", root, apptainer=fake_apptainer, python="/nonexistent/python3")

    async def check(backend):
        assert isinstance(backend, ShellBackend)
        assert await backend.read_file(f"{root}/hello.txt") == b"hello\n"
        await round_trip_hostile_names(backend, root)

    run_backend(connect, check)


def test_apptainer_instance_not_found(fake_apptainer, root):
    message = connect_error(lambda nursery: connect_apptainer(nursery, "other", root, apptainer=fake_apptainer))
    assert message.startswith("apptainer instance 'other' not found: list running instances with `apptainer instance list`")


def test_apptainer_command_not_found(root):
    message = connect_error(lambda nursery: connect_apptainer(nursery, "box", root, apptainer="/nonexistent/apptainer"))
    assert message == "/nonexistent/apptainer: command not found: install Apptainer or give its path with --apptainer"


def test_apptainer_root_missing(fake_apptainer, tmp_path):
    missing = str(tmp_path / "missing")
    message = connect_error(
        lambda nursery: connect_apptainer(nursery, "box", missing, apptainer=fake_apptainer, python=sys.executable)
    )
    assert message == f"directory in apptainer instance 'box' {missing!r} does not exist: create it or check the path"


def test_apptainer_rejects_invalid_instance_name(fake_apptainer):
    async def main():
        async with trio.open_nursery() as nursery:
            with pytest.raises(SourceError, match="invalid instance name '-box'"):
                await connect_apptainer(nursery, "-box", "/", apptainer=fake_apptainer)

    trio.run(main)


def test_open_backend_passes_host_commands(fake_apptainer, root):
    source = Source("apptainer", "box", root, commands=HostCommands(apptainer=fake_apptainer))

    async def check(backend):
        assert await backend.read_file(f"{root}/hello.txt") == b"hello\n"

    run_backend(lambda nursery: open_backend(nursery, source), check)


# Through ssh, with the fake ssh.


@pytest.mark.parametrize("python", [sys.executable, "/nonexistent/python3"])
def test_apptainer_via_ssh_quotes_every_word(fake_apptainer, fake_ssh, root, python, tmp_path):
    via = SshTarget("host", "alice", 2222)

    async def connect(nursery):
        return await connect_apptainer(
            nursery, "box", root, via_ssh=via, apptainer=fake_apptainer, ssh_command=[fake_ssh], python=python
        )

    async def check(backend):
        await round_trip_hostile_names(backend, root)

    run_backend(connect, check)
    assert os.listdir(tmp_path / "scratch") == []


def test_apptainer_via_ssh_instance_not_found(fake_apptainer, fake_ssh, root):
    via = SshTarget("host", "alice", 2222)
    message = connect_error(
        lambda nursery: connect_apptainer(
            nursery, "other", root, via_ssh=via, apptainer=fake_apptainer, ssh_command=[fake_ssh]
        )
    )
    assert message.startswith("apptainer instance 'other' not found on alice@host:2222:")


def test_apptainer_via_ssh_command_not_found_remotely(fake_ssh, root):
    via = SshTarget("host")
    message = connect_error(
        lambda nursery: connect_apptainer(
            nursery, "box", root, via_ssh=via, apptainer="/nonexistent/apptainer", ssh_command=[fake_ssh]
        )
    )
    assert message == (
        "/nonexistent/apptainer: command not found on host: install Apptainer there or give its path with --apptainer"
    )


def test_apptainer_via_ssh_refused(tmp_path, root):
    refusing_ssh = write_script(
        tmp_path / "refusing-ssh", "#!/bin/sh\necho 'alice@host: Permission denied (publickey).' >&2\nexit 255\n"
    )
    via = SshTarget("host", "alice", 2222)
    message = connect_error(
        lambda nursery: connect_apptainer(nursery, "box", root, via_ssh=via, ssh_command=[refusing_ssh])
    )
    assert message.startswith(
        "ssh to alice@host:2222 failed: alice@host: Permission denied (publickey): check your ssh key and config"
    )


def test_apptainer_via_ssh_client_missing(root):
    via = SshTarget("host")
    message = connect_error(
        lambda nursery: connect_apptainer(nursery, "box", root, via_ssh=via, ssh_command=["/nonexistent/ssh"])
    )
    assert message.startswith("/nonexistent/ssh: command not found: install the OpenSSH client")


# A mount through the command line.


@pytest.mark.parametrize("script", [FAKE_APPTAINER, FAKE_APPTAINER_NO_PYTHON], ids=["agent", "shell"])
def test_mount_apptainer_source_with_fake_apptainer(tmp_path, root, script):
    apptainer = write_script(tmp_path / "fake-apptainer", script)
    mount = Mount(f"apptainer://box:{root}", "--apptainer", apptainer)
    try:
        source_file = tmp_path / "report.txt"
        source_file.write_bytes(b"report\n" * 1000)
        subprocess.run(["cp", str(source_file), mount.path], check=True)
        listing = subprocess.run(["ls", mount.path], capture_output=True, check=True, text=True).stdout.split()
        assert sorted(listing) == ["hello.txt", "report.txt"]
        with open(os.path.join(root, "report.txt"), "rb") as file:
            assert file.read() == b"report\n" * 1000
        expected_log = "through the agent" if script is FAKE_APPTAINER else "using the shell fallback"
        assert expected_log in mount.log()
    finally:
        mount.close()


def test_mount_apptainer_missing_instance_fails_with_one_line(fake_apptainer, root, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = sandboxfs(
        "mount", "--apptainer", fake_apptainer, f"apptainer://gone:{root}", str(mountpoint), check=False
    )
    assert result.returncode == 1
    assert result.stderr.startswith("sandboxfs: error: apptainer instance 'gone' not found")
    assert result.stderr.count("\n") == 1


def test_mount_rejects_empty_ssh_command(root, tmp_path):
    result = sandboxfs("mount", "--ssh-command", "", f"apptainer://box:{root}", str(tmp_path), check=False)
    assert result.returncode == 2
    assert "invalid command ''" in result.stderr
