"""``twistd cellmux`` and ``cellmux serve``: options and the service."""

from __future__ import annotations

import os

from twisted.python import usage

from .config import ConfigError, ServerConfig, load_config_file
from .server.auth import generate_token
from .server.service import CellmuxService
from .server.tokenscrub import scrub_token

__all__ = ["Options", "config_from_options", "makeService"]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve ipykernel kernels to websocket clients. Settings come from the "
        "defaults, then the --config TOML file, then these options."
    )
    optParameters = [
        ["host", None, None, "Interface to listen on [default: 127.0.0.1]."],
        ["port", "p", None, "Port to listen on, 0 for any free port [default: 8800].", int],
        ["token", None, None, "API token [default: $CELLMUX_TOKEN, else a generated one]."],
        ["config", "c", None, "A TOML config file (see docs/operations.md)."],
        ["pool-size", None, None, "Ready kernels kept warm [default: 2].", int],
        ["max-kernels", None, None, "Most kernels alive at once [default: 200].", int],
        ["preload", None, None, "Comma-separated modules the nursery imports once."],
        ["runtime-dir", None, None, "Directory for the link socket and kernel dirs."],
        ["database", None, None, "Permalink database: a SQLite path or a plugin's URL."],
        ["max-upload-size", None, None, "Largest upload, in bytes [default: 100 MiB].", int],
        ["kernel-quota", None, None, "Bytes uploads may fill a kernel's dir with.", int],
        ["service-timeout", None, None, "Wall-time limit of POST /service [default: 30].", float],
        ["state-dir", None, None, "Where kernels are recorded for crash recovery."],
    ]

    def postOptions(self) -> None:
        try:
            self["server_config"] = config_from_options(self)
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
    ]:
        if options[option] is not None:
            settings[setting] = options[option]
    if options["preload"]:
        settings["preload"] = [m.strip() for m in options["preload"].split(",") if m.strip()]
    return ServerConfig(**settings)


def makeService(options: Options) -> CellmuxService:
    config: ServerConfig = options["server_config"]
    token = config.token or os.environ.get("CELLMUX_TOKEN") or generate_token()
    # Kernels of a server without root share its uid: nothing of the token
    # may stay readable in /proc (security.md, "Without root").
    scrub_token(token)
    return CellmuxService(config, token)
