"""Tests of the systemd unit systemd/sandboxfs@.service.

systemd-analyze checks the unit file as systemd would load it. The command
lines are checked against the real `sandboxfs` command, so that an option
renamed in the CLI cannot leave the unit behind.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(REPO, "systemd", "sandboxfs@.service")
# Characters systemd allows before an Exec command's path ("-" ignores failure).
EXEC_PREFIXES = "-@:+!"
# An option as argparse prints it in --help: "-f", "--foreground", "--attr-timeout".
HELP_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def unit_settings(key: str) -> list[str]:
    """Return the values of every `key=` line of the unit, in file order."""
    values = []
    with open(UNIT, encoding="utf-8") as unit:
        for line in unit:
            name, sep, value = line.strip().partition("=")
            if sep and name == key:
                values.append(value)
    return values


def split_exec(value: str) -> list[str]:
    """Split an Exec line as systemd does for these lines: `$$` is a literal `$`."""
    words = shlex.split(value.replace("$$", "$"))
    words[0] = words[0].lstrip(EXEC_PREFIXES)
    return words


def sandboxfs_arguments(value: str) -> list[str]:
    """Return the words after `sandboxfs` in an Exec line, or [] if it runs no sandboxfs."""
    words = split_exec(value)
    for index, word in enumerate(words):
        if os.path.basename(word) == "sandboxfs":
            return words[index + 1 :]
    return []


def cli_options(command: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", "sandboxfs", command, "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, f"sandboxfs {command} --help failed: {result.stderr}"
    return set(HELP_OPTION.findall(result.stdout))


def expand(words: list[str], environment: dict[str, str]) -> list[str]:
    """Substitute variables as systemd does: `$NAME` alone splits at spaces, `${NAME}` is one word."""
    expanded = []
    for word in words:
        if re.fullmatch(r"\$[A-Za-z_]\w*", word):
            expanded.extend(environment.get(word[1:], "").split())
        else:
            expanded.append(re.sub(r"\$\{(\w+)\}", lambda match: environment.get(match.group(1), ""), word))
    return expanded


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze not found: install the systemd package (apt-get install systemd)")

    # A template is only checked in full (commands, specifiers) as an instance.
    instance = tmp_path / "sandboxfs@demo.service"
    shutil.copyfile(UNIT, instance)
    result = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True)

    assert result.returncode == 0, f"systemd-analyze verify failed ({result.returncode}):\n{result.stderr}"
    lines_about_unit = [line for line in result.stderr.splitlines() if "sandboxfs@" in line]
    assert lines_about_unit == [], "systemd-analyze verify warned:\n" + "\n".join(lines_about_unit)


def test_unit_runs_mount_and_umount():
    starts = [sandboxfs_arguments(value) for value in unit_settings("ExecStart")]
    stops = [sandboxfs_arguments(value) for value in unit_settings("ExecStop")]

    assert len(starts) == 1
    assert starts[0][:2] == ["mount", "--foreground"]
    assert len(stops) == 1
    assert stops[0][0] == "umount"


@pytest.mark.parametrize("setting", ["ExecStart", "ExecStop"])
def test_unit_uses_only_existing_options(setting):
    for value in unit_settings(setting):
        arguments = sandboxfs_arguments(value)
        assert arguments, f"{setting}={value} does not run sandboxfs"

        command, options = arguments[0], [word for word in arguments[1:] if word.startswith("-")]
        known = cli_options(command)
        unknown = [option for option in options if option not in known]
        assert unknown == [], f"{setting} uses options that `sandboxfs {command} --help` does not list: {unknown}"


def test_unit_commands_parse_with_options():
    from sandboxfs.cli import build_parser

    config = {
        "SOURCE": "docker://alice@box:/workspace",
        "MOUNTPOINT": "/mnt/box",
        "OPTIONS": "--read-only --attr-timeout 5",
    }
    start = expand(sandboxfs_arguments(unit_settings("ExecStart")[0]), config)
    stop = expand(sandboxfs_arguments(unit_settings("ExecStop")[0]), config)

    mount_args = build_parser().parse_args(start)
    assert mount_args.source == config["SOURCE"]
    assert mount_args.mountpoint == config["MOUNTPOINT"]
    assert mount_args.foreground
    assert mount_args.read_only
    assert mount_args.attr_timeout == 5.0
    umount_args = build_parser().parse_args(stop)
    assert umount_args.mountpoint == config["MOUNTPOINT"]


def test_unit_commands_parse_without_options():
    from sandboxfs.cli import build_parser

    config = {"SOURCE": "local:///srv/data", "MOUNTPOINT": "/mnt/data"}
    start = expand(sandboxfs_arguments(unit_settings("ExecStart")[0]), config)

    mount_args = build_parser().parse_args(start)
    assert mount_args.source == config["SOURCE"]
    assert mount_args.mountpoint == config["MOUNTPOINT"]


def run_start_post(mountpoint: str, main_pid: int) -> subprocess.CompletedProcess:
    (value,) = unit_settings("ExecStartPost")
    environment = {**os.environ, "MOUNTPOINT": mountpoint, "MAINPID": str(main_pid)}
    return subprocess.run(split_exec(value), env=environment, capture_output=True, text=True, timeout=30)


def test_start_post_succeeds_on_a_mount_point():
    with subprocess.Popen(["sleep", "30"]) as main:
        try:
            result = run_start_post("/proc", main.pid)
        finally:
            main.kill()

    assert result.returncode == 0, result.stderr


def test_start_post_fails_after_main_exits(tmp_path):
    with subprocess.Popen(["true"]) as main:
        main.wait()

    result = run_start_post(str(tmp_path), main.pid)

    assert result.returncode == 1
