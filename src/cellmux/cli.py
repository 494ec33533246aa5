"""The ``cellmux`` command line."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import TYPE_CHECKING, cast

import cellmux

# Twisted is for ``serve`` only: a terminal command (``cellmux run`` on every
# keypress of an editor) must not pay for importing it (docs/benchmarks.md).
if TYPE_CHECKING:
    from twisted.logger import ILogObserver
    from twisted.python.failure import Failure

__all__ = ["EXIT_SETTINGS", "EXIT_START_FAILED", "main", "start_failure_line"]

#: What CellmuxService logs, with the failure, when it could not start.
START_FAILED_FORMAT = "cellmux could not start"


#: Exit status of `cellmux serve` for bad options or settings (docs/operations.md).
EXIT_SETTINGS = 2
#: Exit status of `cellmux serve` (and twistd) when the server could not start.
EXIT_START_FAILED = 1


def start_failure_line(failure: Failure) -> tuple[str, int] | None:
    """One line for an everyday reason the server could not start, and the exit status.

    None for anything else: an unexpected failure keeps its traceback.
    """
    from twisted.internet.error import CannotListenError

    from .config import ConfigError

    error = failure.value
    if isinstance(error, CannotListenError):
        where = f"{error.interface or '*'}:{error.port}"
        cause = error.socketError
        code = getattr(cause, "errno", None)
        if code == errno.EADDRINUSE:
            why = "it is in use (choose another with --port, or 0 for any free port)"
        elif code == errno.EACCES:
            why = "permission denied (ports below 1024 need root)"
        elif code == errno.EADDRNOTAVAIL:
            why = "this machine has no such address (see --host)"
        else:
            why = getattr(cause, "strerror", None) or str(cause)
        return f"cannot listen on {where}: {why}", EXIT_START_FAILED
    if isinstance(error, ConfigError):
        return str(error), EXIT_SETTINGS
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror}: {error.filename}", EXIT_START_FAILED
    return None


class _StartFailureObserver:
    """Prints an everyday start-up failure as one line instead of its traceback.

    Every other event goes on to C{observer}.
    """

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer
        self.status: int | None = None

    def __call__(self, event: dict) -> None:
        from twisted.logger import LogLevel

        if self.status is not None and event.get("log_level", LogLevel.info) < LogLevel.warn:
            return  # the one line said it: no "Main loop terminated." after it
        failure = event.get("log_failure")
        if failure is not None and event.get("log_format") == START_FAILED_FORMAT:
            line = start_failure_line(failure)
            if line is not None:
                message, self.status = line
                print(f"cellmux serve: {message}", file=sys.stderr, flush=True)
                return
        self.observer(event)


def serve(argv: list[str]) -> int:
    """Run the server in the foreground until interrupted."""
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    from twisted.python import usage

    from . import tap

    options = tap.Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print(f"cellmux serve: {e} (cellmux serve --help lists the options)", file=sys.stderr)
        return EXIT_SETTINGS
    lines: ILogObserver
    if options["server_config"].log_format == "json":
        from .logs import json_observer

        lines = json_observer(sys.stderr)
    else:
        lines = textFileLogObserver(sys.stderr)
    observer = _StartFailureObserver(
        FilteringLogObserver(lines, [LogLevelFilterPredicate(LogLevel.info)])
    )
    # stdout stays the terminal's: the URL with the token is printed there,
    # and must never end up in the log.
    # Any callable taking an event is an observer; the class is not declared
    # @implementer(ILogObserver) so that importing cellmux.cli stays free of
    # Twisted (editors run it on every keypress).
    globalLogBeginner.beginLoggingTo([cast("ILogObserver", observer)], redirectStandardIO=False)
    service = tap.build_service(options)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    if service.start_failed:
        return observer.status if observer.status is not None else EXIT_START_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="cellmux", description="Serve Python kernels to remote clients."
    )
    parser.add_argument("--version", action="version", version=f"cellmux {cellmux.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "serve", help="run the server (cellmux serve --help for its options)", add_help=False
    )
    for name, (help_text, _module) in CLIENT_COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    commands.add_parser("token", help="make a named token (cellmux token new NAME)", add_help=False)
    commands.add_parser(
        "host", help="run kernels for front servers (cellmux host --help)", add_help=False
    )
    commands.add_parser(
        "keys", help="make a CURVE key pair (cellmux keys new NAME --dir DIR)", add_help=False
    )
    # A command's arguments are its own: only what comes before it is ours
    # (argparse would otherwise take abbreviations such as --ver from them).
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    if argv and argv[0] in CLIENT_COMMANDS:
        return run_client_command(argv[0], argv[1:])
    if argv and argv[0] == "token":
        return token_command(argv[1:])
    if argv and argv[0] == "host":
        return host_command(argv[1:])
    if argv and argv[0] == "keys":
        return keys_command(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
    return EXIT_SETTINGS


#: The terminal clients: name -> (help, module in cellmux.terminal). Each
#: module is imported only when its command runs, so that ``serve`` does
#: not load the client.
CLIENT_COMMANDS = {
    "run": ("run a file, some of its lines or a cell in a kernel", "run"),
    "console": ("a terminal console on a kernel", "console"),
    "attach": ("attach a console to a kernel, or --watch it read-only", "watch"),
    "kernels": ("list the server's kernels", "table"),
    "bridge": ("make a kernel look local to Jupyter's ZeroMQ clients", "bridge"),
    "pause": ("stop a kernel's running cell in pdb at its current line", "pause"),
    "debug": ("relay a Debug Adapter Protocol client (VS Code, nvim-dap) to a kernel", "dap"),
}


def token_command(argv: list[str]) -> int:
    """``cellmux token new NAME``: a fresh token and the config table that admits it.

    The token is printed once; the config keeps only its hash.
    """
    from .config import ConfigError, named_tokens
    from .server.auth import generate_token, token_hash

    parser = argparse.ArgumentParser(
        prog="cellmux token",
        description="Make a named token: print it once, with the [tokens.NAME] table "
        "to add to the server's config file (which holds only its hash).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = actions.add_parser("new", help="a fresh token for a user")
    new.add_argument("name", help="the token's name (letters, digits, - and _)")
    new.add_argument(
        "--max-kernels", type=int, default=10, help="kernels it may have at once [default: 10]"
    )
    args = parser.parse_args(argv)
    token = generate_token()
    table = {args.name: {"token_hash": token_hash(token), "max_kernels": args.max_kernels}}
    try:
        named_tokens(table)
    except ConfigError as e:
        print(f"cellmux token: {e}", file=sys.stderr)
        return EXIT_SETTINGS
    print(f"token for {args.name} (shown once; give it to its user):\n  {token}\n")
    print("add to the server's config file:\n")
    print(f"[tokens.{args.name}]")
    print(f'token_hash = "{token_hash(token)}"')
    print(f"max_kernels = {args.max_kernels}")
    return 0


def run_client_command(name: str, argv: list[str]) -> int:
    """Parse C{argv} for the terminal command C{name} and run it."""
    help_text, module_name = CLIENT_COMMANDS[name]
    module = importlib.import_module("cellmux.terminal." + module_name)
    parser = argparse.ArgumentParser(prog=f"cellmux {name}", description=help_text)
    module.add_arguments(parser)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print the client library's log (for reporting a problem)",
    )
    args = parser.parse_args(argv)
    # cellmux run's quick path imports no logging (17 ms); the command calls
    # client_logging itself before it takes the full client.
    if not getattr(module, "DEFERS_LOGGING", False):
        client_logging(args.verbose)
    return module.main(args)


def client_logging(verbose: bool) -> None:
    """Send the log (the client library's, asyncio's, websockets') to stderr with -v, else nowhere.

    The commands say themselves what the user needs to know; log lines such
    as "stdin handler failed (Interrupted())" are for debugging, and without
    a handler Python prints every warning on the user's terminal.
    """
    import logging

    root = logging.getLogger()
    if not verbose:
        root.addHandler(logging.NullHandler())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cellmux: %(name)s: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("cellmux").setLevel(logging.DEBUG)


if __name__ == "__main__":
    sys.exit(main())


def keys_command(argv: list[str]) -> int:
    """``cellmux keys new NAME --dir DIR``: a CURVE key pair for a front or a
    kernel host (docs/scaling.md): DIR/NAME.key (public) and
    DIR/NAME.key_secret (secret, mode 0600)."""
    import re

    parser = argparse.ArgumentParser(
        prog="cellmux keys",
        description="Make a ZeroMQ CURVE key pair for a front server or a kernel host.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = actions.add_parser("new", help="a fresh key pair")
    new.add_argument("name", help="the pair's name (letters, digits, ., - and _)")
    new.add_argument("--dir", required=True, help="where to write NAME.key and NAME.key_secret")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", args.name):
        print(f"cellmux keys: bad name {args.name!r}", file=sys.stderr)
        return EXIT_SETTINGS
    import zmq.auth

    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    public = os.path.join(args.dir, f"{args.name}.key")
    secret = os.path.join(args.dir, f"{args.name}.key_secret")
    if os.path.exists(public) or os.path.exists(secret):
        print(f"cellmux keys: {args.name} exists in {args.dir}; not replaced", file=sys.stderr)
        return EXIT_SETTINGS
    # The secret file is created 0600 from the start: no window where others may read it.
    old_umask = os.umask(0o077)
    try:
        zmq.auth.create_certificates(args.dir, args.name)
    finally:
        os.umask(old_umask)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    print(f"public key (give to the other side): {public}")
    print(f"secret key (keep here, mode 0600):   {secret}")
    return 0


def host_command(argv: list[str]) -> int:
    """``cellmux host``: run kernels for front servers (docs/scaling.md)."""
    import socket

    parser = argparse.ArgumentParser(
        prog="cellmux host",
        description="Run a nursery on this machine for cellmux front servers, linked over "
        "TCP with ZeroMQ CURVE (docs/scaling.md, Kernel hosts).",
    )
    parser.add_argument(
        "--front",
        action="append",
        required=True,
        help="a front's hosts_listen endpoint (tcp://ADDR:PORT); repeat for several fronts",
    )
    parser.add_argument(
        "--front-key",
        action="append",
        required=True,
        help="a front's public key file: one for all fronts, or one per --front, in the same order",
    )
    parser.add_argument(
        "--key", required=True, help="this host's secret key file (NAME.key_secret)"
    )
    parser.add_argument("--name", default=None, help="this host's name [default: the host name]")
    parser.add_argument("--label", action="append", default=[], help="a label; repeatable")
    parser.add_argument("--max-kernels", type=int, default=None, help="most kernels at once")
    parser.add_argument("--config", "-c", default=None, help="a cellmux TOML config file")
    parser.add_argument("--runtime-dir", default=None, help="where kernel links and dirs go")
    parser.add_argument(
        "--state-dir",
        default=None,
        help="where the host's record goes, for the next start to clean up after a crash "
        "[default: $XDG_STATE_HOME/cellmux]",
    )
    parser.add_argument(
        "--host-timeout", type=float, default=None, help="seconds before a silent front is lost"
    )
    args = parser.parse_args(argv)

    import zmq.auth

    from .config import ConfigError, ServerConfig, load_config_file
    from .protocol.hostlink import valid_name

    try:
        settings_ = load_config_file(args.config) if args.config else {}
        if args.runtime_dir is not None:
            settings_["runtime_dir"] = args.runtime_dir
        if args.state_dir is not None:
            settings_["state_dir"] = args.state_dir
        if args.max_kernels is not None:
            settings_["max_kernels"] = args.max_kernels
        if args.host_timeout is not None:
            settings_["host_timeout"] = args.host_timeout
        config = ServerConfig(**settings_)
        name = args.name or socket.gethostname().split(".")[0]
        for value in [name, *args.label]:
            if not valid_name(value):
                raise ConfigError(f"{value!r} is not a host name or label (letters, digits, ._-)")
        for front in args.front:
            if not front.startswith("tcp://"):
                raise ConfigError(f"--front must be a tcp:// endpoint, not {front!r}")
        if len(args.front_key) not in (1, len(args.front)):
            raise ConfigError(
                f"give one --front-key for all fronts or one per --front, in the same order "
                f"({len(args.front)} fronts, {len(args.front_key)} keys)"
            )
        try:
            front_keys = [zmq.auth.load_certificate(path)[0] for path in args.front_key]
            public, secret = zmq.auth.load_certificate(args.key)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read a key file: {e}") from None
        if not secret:
            raise ConfigError(f"{args.key} holds no secret key (give NAME.key_secret)")
    except (ConfigError, TypeError) as e:
        print(f"cellmux host: {e}", file=sys.stderr)
        return EXIT_SETTINGS

    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from .host.service import HostService, HostSettings

    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.info)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    host = HostService(
        config,
        HostSettings(
            name=name,
            labels=tuple(args.label),
            fronts=tuple(args.front),
            front_keys=tuple(front_keys * len(args.front) if len(front_keys) == 1 else front_keys),
            public_key=public,
            secret_key=secret,
            max_kernels=config.max_kernels,
            timeout=config.host_timeout,
        ),
    )
    reactor.callWhenRunning(host.startService)
    reactor.addSystemEventTrigger("before", "shutdown", host.stopService)
    reactor.run()
    return EXIT_START_FAILED if host.start_failed else 0
