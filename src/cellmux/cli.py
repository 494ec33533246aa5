"""The ``cellmux`` command line."""

from __future__ import annotations

import argparse
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
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return serve(rest)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
