"""The ``cellmux`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys

from twisted.python import usage

import cellmux

__all__ = ["main"]


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

    from . import tap

    options = tap.Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print(f"cellmux serve: {e}\n\n{options}", file=sys.stderr)
        return 2
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.info)]
    )
    # stdout stays the terminal's: the URL with the token is printed there,
    # and must never end up in the log.
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    service = tap.makeService(options)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 1 if service.start_failed else 0


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
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return serve(rest)
    if args.command in CLIENT_COMMANDS:
        return run_client_command(args.command, rest)
    parser.print_help()
    return 2


#: The terminal clients: name -> (help, module in cellmux.terminal). Each
#: module is imported only when its command runs, so that ``serve`` does
#: not load the client.
CLIENT_COMMANDS = {
    "run": ("run a file, some of its lines or a cell in a kernel", "run"),
    "console": ("a terminal console on a kernel", "console"),
    "attach": ("attach a console to a kernel, or --watch it read-only", "watch"),
    "kernels": ("list the server's kernels", "table"),
}


def run_client_command(name: str, argv: list[str]) -> int:
    """Parse C{argv} for the terminal command C{name} and run it."""
    help_text, module_name = CLIENT_COMMANDS[name]
    module = importlib.import_module("cellmux.terminal." + module_name)
    parser = argparse.ArgumentParser(prog=f"cellmux {name}", description=help_text)
    module.add_arguments(parser)
    return module.main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
