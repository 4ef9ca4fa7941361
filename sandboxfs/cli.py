"""The `sandboxfs` command: mount, umount, list.

Every error the package expects (bad source, unreachable sandbox, busy mount
point) is printed as one line on stderr, with exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from . import __version__
from .backend import ConnectError
from .cli_condor import CondorError, add_condor_commands, command_words, run_condor
from .mount import MountError, mount, mounted, pid_alive, umount
from .options import MountOptions
from .recovery import kept_copies
from .sources import HostCommands, SourceError, parse_source


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}: give a number such as 1 or 0.5") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}: it must not be negative")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}: it must be more than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandboxfs",
        description=(
            "Mount a sandbox (a Docker container, an Apptainer instance, an HTCondor job's "
            "scratch directory or a host directory) as a local directory."
        ),
    )
    parser.add_argument("--version", action="version", version=f"sandboxfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount_parser = commands.add_parser("mount", help="mount a sandbox on a directory")
    mount_parser.add_argument(
        "source",
        help=(
            "docker://[USER@]CONTAINER[:/dir], apptainer://INSTANCE[:/dir][?via=ssh://[USER@]HOST[:PORT]], "
            "condor://[USER@]SUBMIT_HOST[:PORT]/CLUSTER.PROC[:/dir] or local:///abs/dir"
        ),
    )
    mount_parser.add_argument("mountpoint", help="an existing directory (its contents are hidden while mounted)")
    mount_parser.add_argument("-f", "--foreground", action="store_true", help="stay attached; log to stderr")
    mount_parser.add_argument("--debug", action="store_true", help="log each FUSE operation (implies more logging)")
    mount_parser.add_argument("--read-only", action="store_true", help="mount read-only: writes fail with EROFS")
    mount_parser.add_argument(
        "--allow-other", action="store_true", help="let other users use the mount (needs user_allow_other in /etc/fuse.conf)"
    )
    mount_parser.add_argument(
        "--idmap",
        choices=["user", "none"],
        default="user",
        help="user (default): the sandbox user's files appear as yours; none: show the sandbox's uids and gids",
    )
    mount_parser.add_argument(
        "--symlinks",
        choices=["contain", "raw"],
        default="contain",
        help="contain (default): symlinks never lead out of the mount; raw: show targets unchanged (trusted sandboxes only)",
    )
    mount_parser.add_argument("--attr-timeout", type=_seconds, default=1.0, metavar="SECONDS", help="attribute cache time (default 1)")
    mount_parser.add_argument("--entry-timeout", type=_seconds, default=1.0, metavar="SECONDS", help="name cache time (default 1)")
    mount_parser.add_argument(
        "--negative-timeout", type=_seconds, default=1.0, metavar="SECONDS", help="time a missing name is remembered (default 1)"
    )
    mount_parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=MountOptions.timeout,
        metavar="SECONDS",
        help="how long to wait for the sandbox to reply to one request before it fails with EIO and the mount "
        f"connects again (default {MountOptions.timeout:g})",
    )
    mount_parser.add_argument("--recovery-dir", metavar="DIR", help="where data of failed uploads is kept (default ~/.local/state/sandboxfs/recovery)")
    mount_parser.add_argument(
        "--apptainer",
        default=HostCommands.apptainer,
        metavar="PATH",
        help="the apptainer command for apptainer:// sources, run on the host that runs the instance (default: apptainer, found on PATH)",
    )
    mount_parser.add_argument(
        "--ssh-command",
        type=command_words,
        default=HostCommands.ssh,
        metavar="CMD",
        help="the ssh command and its options for ?via=ssh:// and condor:// sources, split as a shell would, "
        "such as 'ssh -i ~/.ssh/box_key' (default: ssh)",
    )
    mount_parser.add_argument("--log-file", metavar="FILE", help="log file of the background process (default ~/.local/state/sandboxfs/log/)")

    umount_parser = commands.add_parser("umount", help="upload pending writes, then unmount")
    umount_parser.add_argument("mountpoint")
    umount_parser.add_argument("-z", "--lazy", action="store_true", help="detach now even if files are open")

    commands.add_parser("list", help="list active sandboxfs mounts")
    add_condor_commands(commands)
    return parser


def _mount(args: argparse.Namespace) -> None:
    source = parse_source(args.source)
    source = dataclasses.replace(source, commands=HostCommands(apptainer=args.apptainer, ssh=tuple(args.ssh_command)))
    options = MountOptions(
        attr_timeout=args.attr_timeout,
        entry_timeout=args.entry_timeout,
        negative_timeout=args.negative_timeout,
        timeout=args.timeout,
        idmap=args.idmap,
        symlinks=args.symlinks,
        read_only=args.read_only,
        allow_other=args.allow_other,
        debug=args.debug,
    )
    if args.recovery_dir:
        options.recovery_dir = os.path.abspath(args.recovery_dir)
    mount(source, args.mountpoint, options, foreground=args.foreground, log_file=args.log_file)


def _list() -> None:
    mounts = mounted()
    if not mounts:
        print("no sandboxfs mounts")
    else:
        print(f"{'MOUNTPOINT':<32} {'SOURCE':<40} {'PID':>7}  STATUS")
    for info in mounts:
        if not pid_alive(info.pid):
            status = "broken: its process is gone; run `sandboxfs umount` to clean up"
        else:
            status = info.status
        pid = str(info.pid) if info.pid else "-"
        print(f"{info.mountpoint:<32} {info.source:<40} {pid:>7}  {status}")
    directories = [MountOptions().recovery_dir] + [info.recovery_dir for info in mounts if info.recovery_dir]
    for directory in dict.fromkeys(directories):
        _list_kept(directory)


def _list_kept(directory: str) -> None:
    copies = kept_copies(directory)
    if not copies:
        return
    print(f"\nkept in {directory} after failed uploads (copy each back, then delete it):")
    for copy in copies:
        origin = f" from {copy.sandbox_path}" if copy.sandbox_path else ""
        print(f"  {os.path.basename(copy.path)}  {copy.size} bytes{origin}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "mount":
            _mount(args)
        elif args.command == "umount":
            umount(args.mountpoint, lazy=args.lazy)
        elif args.command == "list":
            _list()
        elif args.command == "condor":
            run_condor(args)
    except (SourceError, ConnectError, MountError, CondorError) as exc:
        print(f"sandboxfs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
