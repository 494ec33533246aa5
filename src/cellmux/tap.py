"""``twistd cellmux`` and ``cellmux serve``: options and the service."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable

from twisted.python import usage

import cellmux

from .cli import EXIT_SETTINGS, EXIT_START_FAILED
from .config import ConfigError, ServerConfig, load_config_file
from .server.auth import generate_token
from .server.service import CellmuxService
from .server.tls import certificate_options
from .server.tokenscrub import scrub_token

__all__ = ["Options", "build_service", "config_from_options", "makeService"]


def _number(
    option: str, kind: type, what: str, low: float | None = None, high: float | None = None
) -> Callable[[str], float]:
    """A coercer for an option's value that explains a bad one in one line.

    (Twisted's own message for a failed int() is "Parameter type enforcement
    failed: invalid literal for int() with base 10".)
    """

    def coerce(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"--{option}: {text!r} is not {what}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise usage.UsageError(f"--{option}: {text!r} is not {what}")
        return value

    return coerce


class Options(usage.Options):
    longdesc = (
        "Serve ipykernel kernels to websocket clients. Settings come from the "
        "defaults, then the --config TOML file, then these options."
    )
    optParameters = [
        ["host", None, None, "Interface to listen on [default: 127.0.0.1]."],
        [
            "port",
            "p",
            None,
            "Port to listen on, 0 for any free port [default: 8800].",
            _number("port", int, "a port number (0 to 65535)", 0, 65535),
        ],
        ["token", None, None, "API token [default: $CELLMUX_TOKEN, else a generated one]."],
        ["config", "c", None, "A TOML config file (see docs/operations.md)."],
        [
            "pool-size",
            None,
            None,
            "Ready kernels kept warm [default: 2].",
            _number("pool-size", int, "a whole number", 0),
        ],
        [
            "max-kernels",
            None,
            None,
            "Most kernels alive at once [default: 200].",
            _number("max-kernels", int, "a whole number", 0),
        ],
        ["preload", None, None, "Comma-separated modules the nursery imports once."],
        ["runtime-dir", None, None, "Directory for the link socket and kernel dirs."],
        ["database", None, None, "Permalink database: a SQLite path or a plugin's URL."],
        [
            "max-upload-size",
            None,
            None,
            "Largest upload, in bytes [default: 100 MiB].",
            _number("max-upload-size", int, "a size in bytes", 1),
        ],
        [
            "kernel-quota",
            None,
            None,
            "Bytes uploads may fill a kernel's dir with.",
            _number("kernel-quota", int, "a size in bytes", 1),
        ],
        [
            "service-timeout",
            None,
            None,
            "Wall-time limit of POST /service [default: 30].",
            _number("service-timeout", float, "a number of seconds", 0),
        ],
        ["state-dir", None, None, "Where kernels are recorded for crash recovery."],
        ["tls-cert", None, None, "PEM certificate (chain): serve https and wss (with --tls-key)."],
        ["tls-key", None, None, "PEM private key of --tls-cert (unencrypted)."],
        [
            "trusted-proxies",
            None,
            None,
            "Comma-separated proxy addresses/networks whose X-Forwarded-* headers count.",
        ],
        ["log-format", None, None, "text or json (one JSON object per line) [default: text]."],
        ["front-id", None, None, "This front's id behind a proxy: 1-8 hex digits (scaling.md)."],
        ["hosts-listen", None, None, "ZeroMQ endpoint kernel hosts connect to (tcp://ADDR:PORT)."],
        ["hosts-secret-key", None, None, "This front's secret key file (cellmux keys new)."],
        ["hosts-authorized-dir", None, None, "Directory of authorised hosts' public keys."],
        [
            "host-timeout",
            None,
            None,
            "Seconds without a heartbeat before a kernel host is lost [default: 3].",
            _number("host-timeout", float, "a number of seconds", 0),
        ],
    ]
    optFlags = [
        ["no-local-kernels", None, "Run kernels only on kernel hosts, none on this server."],
    ]

    def getSynopsis(self) -> str:
        # Under twistd the parent's synopsis comes first ("twistd [options]
        # cellmux [options]"); alone, this is `cellmux serve`.
        if self.parent is None:
            return "usage: cellmux serve [options]"
        return super().getSynopsis()

    def opt_version(self) -> None:
        """Display cellmux's version and exit."""
        print(f"cellmux {cellmux.__version__}")
        raise SystemExit(0)

    opt_h = usage.Options.opt_help  # -h as well as --help (no option uses -h)

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise  # cellmux serve says it
            # Under twistd: Twisted before 26 prints the error and exits 0.
            print(f"twistd cellmux: {e}", file=sys.stderr)
            raise SystemExit(EXIT_SETTINGS) from None

    def postOptions(self) -> None:
        try:
            config = self["server_config"] = config_from_options(self)
            if config.tls_cert and config.tls_key:  # config.tls
                # A wrong file is one line and exit status 2 now, not a
                # server that fails every handshake later.
                certificate_options(config.tls_cert, config.tls_key)
        except (ConfigError, TypeError) as e:
            raise usage.UsageError(str(e)) from None


def config_from_options(options: Options) -> ServerConfig:
    settings = load_config_file(options["config"]) if options["config"] else {}
    for option, setting in [
        ("host", "host"),
        ("port", "port"),
        ("token", "token"),
        ("pool-size", "pool_size"),
        ("max-kernels", "max_kernels"),
        ("runtime-dir", "runtime_dir"),
        ("database", "database"),
        ("max-upload-size", "max_upload_size"),
        ("kernel-quota", "kernel_quota"),
        ("service-timeout", "service_timeout"),
        ("state-dir", "state_dir"),
        ("tls-cert", "tls_cert"),
        ("tls-key", "tls_key"),
        ("log-format", "log_format"),
        ("front-id", "front_id"),
        ("hosts-listen", "hosts_listen"),
        ("hosts-secret-key", "hosts_secret_key"),
        ("hosts-authorized-dir", "hosts_authorized_dir"),
        ("host-timeout", "host_timeout"),
    ]:
        if options[option] is not None:
            settings[setting] = options[option]
    if options["trusted-proxies"] is not None:
        settings["trusted_proxies"] = _split(options["trusted-proxies"])
    if not settings.get("metrics_token") and os.environ.get("CELLMUX_METRICS_TOKEN"):
        settings["metrics_token"] = os.environ["CELLMUX_METRICS_TOKEN"]
    if options["no-local-kernels"]:
        settings["local_kernels"] = False
    if options["preload"]:
        settings["preload"] = [m.strip() for m in options["preload"].split(",") if m.strip()]
    return ServerConfig(**settings)


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def build_service(options: Options) -> CellmuxService:
    """The server for parsed C{options} (``cellmux serve`` runs it itself)."""
    config: ServerConfig = options["server_config"]
    # Only the config holds it now (kernels never inherit the environment).
    os.environ.pop("CELLMUX_METRICS_TOKEN", None)
    token = config.token or os.environ.get("CELLMUX_TOKEN") or generate_token()
    # Kernels of a server without root share its uid: nothing of the token
    # may stay readable in /proc (security.md, "Without root").
    scrub_token(token)
    # With a front_id the server re-reads the file's [tokens] (scaling.md).
    path = options["config"]
    return CellmuxService(config, token, config_path=os.path.abspath(path) if path else None)


def makeService(options: Options) -> CellmuxService:
    """The server for ``twistd cellmux``, which exits 1 if it could not start.

    twistd itself always exits 0 once its reactor stops, and a server that
    failed to start stops the reactor; a supervisor (systemd, a container
    runtime) must see the failure.
    """
    service = build_service(options)
    atexit.register(_exit_if_start_failed, service)
    twistd = options.parent
    if options["server_config"].log_format == "json" and not (twistd and twistd.get("logger")):
        # twistd builds its log observer itself, before this runs.
        print(
            "twistd cellmux: log_format = json is for cellmux serve; "
            "under twistd pass --logger cellmux.logs.json_observer",
            file=sys.stderr,
        )
    return service


def _exit_if_start_failed(service: CellmuxService) -> None:
    if service.start_failed:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        # At interpreter exit, the one way left to set the status.
        os._exit(EXIT_START_FAILED)
