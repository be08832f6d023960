"""The vhotplug command line: global options and the one error boundary.

Commands raise ``VhotplugError``; only ``main`` turns errors into a message on
stderr and a documented exit code. Tracebacks appear only with ``--debug``.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import libvirt
import typer

from vhotplug import __version__
from vhotplug.cli import (
    attach_cmd,
    check_cmd,
    detach_cmd,
    host_cmd,
    info_cmd,
    lab_cmd,
    list_cmd,
    memory_cmd,
    prepare_cmd,
    recover_cmd,
    vcpu_cmd,
)
from vhotplug.cli.state import AppState, OutputFormat
from vhotplug.errors import ExitCode, InvalidRequest, VhotplugError
from vhotplug.host import journal
from vhotplug.virt.errors import translate

try:  # Typer >= 0.22 vendors its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older Typer depends on click itself
    from click import exceptions as click_exc  # type: ignore[no-redef]

app = typer.Typer(
    name="vhotplug",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Hot-plug devices into running libvirt guests and prove, inside the guest, that they arrived or left.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vhotplug {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    connect: Annotated[
        str | None,
        typer.Option("--connect", "-c", metavar="URI",
                     help="Hypervisor URI (default: $LIBVIRT_DEFAULT_URI, else libvirt's default)."),
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o", help="table for people, json for scripts.")]
    = OutputFormat.table,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    ssh_config: Annotated[str | None, typer.Option(
        "--ssh-config", metavar="FILE",
        help="OpenSSH client config for --ssh/--ssh-jump aliases (like ssh -F; default: $VHOTPLUG_SSH_CONFIG, "
             "else ~/.ssh/config).")] = None,
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                  help="Print the version and exit.")] = None,
) -> None:
    uri = connect or os.environ.get("LIBVIRT_DEFAULT_URI") or None
    if uri is not None and not uri.isprintable():
        # libvirt's Python binding raised UnicodeEncodeError (a traceback) for a URI that is not UTF-8 (argv
        # bytes that are not), and a newline in one split its "cannot connect" message over several lines.
        raise InvalidRequest(f"invalid URI {uri!r}: control characters, or bytes that are not UTF-8",
                             hint="check -c/--connect or LIBVIRT_DEFAULT_URI")
    ctx.obj = AppState(uri=uri, output=output, debug=debug)
    if ssh_config:
        # Where the guest layer looks (vhotplug.guest.sshconfig), as ssh -F.
        os.environ["VHOTPLUG_SSH_CONFIG"] = ssh_config
    if ctx.invoked_subcommand != "recover" and (warning := journal.stale_warning()):
        print(f"vhotplug: warning: {warning}", file=sys.stderr)


app.command("list")(list_cmd.list_devices)
app.add_typer(attach_cmd.app, name="attach")
app.command("detach")(detach_cmd.detach)
app.add_typer(vcpu_cmd.app, name="vcpu")
app.add_typer(memory_cmd.app, name="memory")
app.command("prepare")(prepare_cmd.prepare)
app.command("check")(check_cmd.check)
app.command("recover")(recover_cmd.recover)
app.add_typer(lab_cmd.app, name="lab")
app.add_typer(host_cmd.app, name="host")
app.add_typer(info_cmd.app, name="info")


def _print_traceback() -> None:
    import traceback  # --debug only: most runs never need it

    traceback.print_exc()


def _report(exc: VhotplugError) -> None:
    print(f"vhotplug: error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"vhotplug: hint: {exc.hint}", file=sys.stderr)


def _argv_string(arg: str) -> bool:
    try:
        return b"\0" not in os.fsencode(arg)
    except UnicodeEncodeError:
        return False


def run(args: list[str]) -> int:
    """Run the CLI on ``args`` and return the exit code (see README, "Exit codes")."""
    debug = "--debug" in args
    for n, arg in enumerate(args, 1):
        # An exec'd process never has a NUL in its arguments (they are C strings), nor a string os.fsencode cannot
        # encode (argv bytes that are not UTF-8 decode to surrogates it can); an embedding caller can pass either,
        # and they reached os.stat, libvirt or lxml as ValueError/UnicodeEncodeError (a traceback). Refused here.
        if not _argv_string(arg):
            _report(InvalidRequest(f"argument {n} cannot come from a command line (a NUL character or an "
                                   f"unpaired surrogate): {arg[:80]!r}"))
            return int(ExitCode.INVALID)
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name="vhotplug", standalone_mode=False)
    except VhotplugError as exc:
        if debug:
            _print_traceback()
        _report(exc)
        return int(exc.exit_code)
    except libvirt.libvirtError as exc:  # a libvirt error no layer translated: still one line, not a traceback
        if debug:
            _print_traceback()
        err = translate(exc)
        _report(err)
        return int(err.exit_code)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except click_exc.ClickException as exc:
        exc.show()
        return int(ExitCode.USAGE if isinstance(exc, click_exc.UsageError) else ExitCode.FAILURE)
    except (typer.Abort, KeyboardInterrupt):
        print("vhotplug: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    return rv if isinstance(rv, int) else int(ExitCode.OK)


def main(argv: list[str] | None = None) -> None:
    """Entry point. As a process of its own, vhotplug skips the interpreter's teardown:
    every connection is closed explicitly by then, and the teardown cost ~27 ms a command."""
    code = run(sys.argv[1:] if argv is None else argv)
    if argv is not None:  # called in-process (tests, embedding): leave the interpreter alone
        sys.exit(code)
    if (facts := sys.modules.get("vhotplug.host.facts")) is not None:
        facts.cleanup()  # os._exit below skips atexit handlers: copies of a remote host's facts go now
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # e.g. `vhotplug list DOM | head -1`
        code = code or int(ExitCode.FAILURE)
    os._exit(code)
