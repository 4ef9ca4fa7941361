"""The `sandboxfs condor` command: `submit` starts a sandbox job, `rm` removes it.

`add_condor_commands` adds the command to the main parser, and `run_condor`
runs it. Expected failures raise CondorError with a one-line message.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from sandboxfs.condor_jobs import (
    DEFAULT_DURATION,
    STRATEGIES,
    CondorError,
    JobRequest,
    SubmitNode,
    check_job_id,
    check_job_name,
    check_output_name,
    new_job_dir,
    parse_submit_host,
    plan_staging,
    remove_job,
    submit_description,
    submit_job,
)
from sandboxfs.sources import CONDOR_LOCAL_HOST

__all__ = ["CondorError", "add_condor_commands", "command_words", "run_condor"]


def _positive_int(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a whole number of at least 1")
    return int(text)


def command_words(text: str) -> tuple[str, ...]:
    """Split a command given as one option value, as a shell would; reject an empty one."""
    try:
        words = tuple(shlex.split(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid command {text!r}: {exc}") from None
    if not words:
        raise argparse.ArgumentTypeError("invalid command '': give a program, such as ssh")
    return words


def _add_route_options(parser: argparse.ArgumentParser) -> None:
    route = parser.add_mutually_exclusive_group()
    route.add_argument(
        "--submit-host",
        metavar="[USER@]HOST[:PORT]",
        help="the HTCondor submit node, reached with ssh; the HTCondor tools run there",
    )
    route.add_argument(
        "--local",
        action="store_true",
        help="this host is the submit node: use HTCondor's htcondor2 Python bindings here, "
        "or condor_submit and condor_rm when htcondor2 cannot be imported",
    )
    parser.add_argument(
        "--ssh-command",
        type=command_words,
        default=("ssh",),
        metavar="CMD",
        help="the ssh command and its options, split as a shell would, such as 'ssh -F ~/.ssh/cluster' (default: ssh)",
    )


def add_condor_commands(subparsers) -> None:
    """Add the `condor` command, with `submit` and `rm`, to the main parser's subparsers."""
    condor = subparsers.add_parser("condor", help="start or remove an HTCondor sandbox job")
    commands = condor.add_subparsers(dest="condor_command", required=True, metavar="COMMAND")

    submit = commands.add_parser(
        "submit",
        help="submit a job that sleeps with FILES in its scratch directory, to be mounted",
        description="Submit a vanilla-universe job that puts FILES in its scratch directory and sleeps, "
        "so that `sandboxfs mount condor://...` can mount it. Prints the job id (CLUSTER.PROC) on stdout.",
    )
    submit.add_argument("files", nargs="*", metavar="FILES", help="files to put in the job's scratch directory")
    _add_route_options(submit)
    submit.add_argument("--dry-run", action="store_true", help="print the staging plan and the submit description; copy and submit nothing")
    submit.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="how FILES reach the job: embed (in the arguments, files under 1 KiB, 8 KiB in all), "
        "transfer (copied to the submit node, then transfer_input_files), shared (used in place in --shared-dir), "
        "auto (default: embed, transfer or shared by size)",
    )
    submit.add_argument(
        "--shared-dir",
        metavar="DIR",
        help="a directory that the submit and execute nodes share (AFS, EOS, NFS); with --strategy shared, "
        "FILES are paths in it on the submit node",
    )
    submit.add_argument(
        "--output",
        action="append",
        default=[],
        metavar="FILE",
        type=_output_name,
        help="a file of the scratch directory to copy back to the job directory on the submit node when the job "
        "ends by itself (not on condor rm); may be repeated. A missing output puts the job on hold",
    )
    submit.add_argument("--request-memory", type=_positive_int, metavar="MB", help="memory for the job, in MiB (default: HTCondor's)")
    submit.add_argument("--request-cpus", type=_positive_int, metavar="N", help="CPU cores for the job (default: HTCondor's, 1)")
    submit.add_argument(
        "--duration",
        type=_positive_int,
        default=DEFAULT_DURATION,
        metavar="SECONDS",
        help=f"how long the job sleeps before it exits by itself (default: {DEFAULT_DURATION}, one day)",
    )
    submit.add_argument("--name", default="sandbox", metavar="NAME", help="the job's batch name and job directory prefix (default: sandbox)")

    rm = commands.add_parser("rm", help="remove a sandbox job (condor_rm)")
    rm.add_argument("job", metavar="JOB", help="the job id, CLUSTER.PROC")
    _add_route_options(rm)


def _output_name(text: str) -> str:
    try:
        return check_output_name(text)
    except CondorError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_condor(args: argparse.Namespace) -> None:
    """Run `condor submit` or `condor rm`; raise CondorError on an expected failure."""
    host = parse_submit_host(args.submit_host) if args.submit_host is not None else None
    if host is None and not args.local and not getattr(args, "dry_run", False):
        raise CondorError("no submit node given: give --submit-host [USER@]HOST[:PORT], or --local on the submit node")
    if args.condor_command == "rm":
        job_id = check_job_id(args.job)
        node = SubmitNode(host, args.ssh_command)
        try:
            message = remove_job(node, job_id)
        finally:
            node.close()
        print(message or f"removed job {job_id}", file=sys.stderr)
        return
    _submit(args, host)


def _submit(args: argparse.Namespace, host) -> None:
    if not args.files:
        raise CondorError("no FILES given: name at least one file to put in the sandbox")
    request = JobRequest(
        files=list(args.files),
        strategy=args.strategy,
        shared_dir=args.shared_dir,
        outputs=list(args.output),
        request_memory=args.request_memory,
        request_cpus=args.request_cpus,
        duration=args.duration,
        name=check_job_name(args.name),
    )
    plan = plan_staging(request)
    job_dir = new_job_dir(request.name)

    if args.dry_run:
        _print_dry_run(request, plan, job_dir)
        return

    node = SubmitNode(host, args.ssh_command)
    try:
        job = submit_job(node, request, plan, job_dir)
    finally:
        node.close()

    print(job.job_id)
    source = f"condor://{host if host is not None else CONDOR_LOCAL_HOST}/{job.job_id}"
    print(f"submitted job {job.job_id}; its files are in {job.job_dir} on {node.label}", file=sys.stderr)
    print(f"mount it with: sandboxfs mount {source} MOUNTPOINT", file=sys.stderr)
    if request.outputs:
        print(f"outputs come back to {job.job_dir} when the job ends after {request.duration} s", file=sys.stderr)
    print(f"remove it with: sandboxfs condor rm {_route_text(host)} {job.job_id}", file=sys.stderr)


def _route_text(host) -> str:
    return f"--submit-host {host}" if host is not None else "--local"


def _print_dry_run(request: JobRequest, plan, job_dir: str) -> None:
    # The plan goes to stderr, so that stdout is a submit description that
    # condor_submit accepts as it is.
    print(f"# staging plan (job directory ~/{job_dir} on the submit node):", file=sys.stderr)
    for line in plan.describe():
        print(f"#   {line}", file=sys.stderr)
    sys.stdout.write(submit_description(request, plan, f"$ENV(HOME)/{job_dir}"))
