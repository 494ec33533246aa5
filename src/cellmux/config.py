# -*- test-case-name: tests.test_config -*-
"""Server configuration: one frozen value, built from defaults, an optional
TOML file, and command-line options (in that order of precedence)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import attrs

from .protocol import DEFAULT_MAX_FRAME_SIZE

__all__ = ["KERNEL_ENV_PASSTHROUGH", "ConfigError", "ServerConfig", "load_config_file"]

DEFAULT_PORT = 8800

#: Variables a kernel inherits from the server's environment; everything
#: else (tokens, credentials, the server's own settings) stays behind.
KERNEL_ENV_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "VIRTUAL_ENV")


class ConfigError(ValueError):
    """A setting has a value the server cannot use."""


def _positive(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{attribute.name} must be positive, not {value!r}")


def _not_negative(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{attribute.name} must not be negative, not {value!r}")


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Everything the server can be told. See docs/operations.md."""

    #: Interface and port of the HTTP and websocket listener (0: any free port).
    host: str = "127.0.0.1"
    port: int = attrs.field(default=DEFAULT_PORT, validator=_not_negative)
    #: The API token; None means: generate one at start and print it.
    token: str | None = None
    #: Ready kernels kept forked and initialised, waiting for a client.
    pool_size: int = attrs.field(default=2, validator=_not_negative)
    #: Most kernels (in use or pooled) alive at once.
    max_kernels: int = attrs.field(default=200, validator=_positive)
    #: Modules the nursery imports once, before forking, for every kernel.
    preload: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: Where the link socket and kernel working directories live
    #: (None: a fresh private directory under the system temp dir).
    runtime_dir: str | None = None
    #: Largest frame accepted from a client or a kernel, in bytes.
    max_frame_size: int = attrs.field(default=DEFAULT_MAX_FRAME_SIZE, validator=_positive)
    #: Seconds a kernel may take from fork to ready before it is killed.
    kernel_start_timeout: float = attrs.field(default=60.0, validator=_positive)
    #: Seconds between SIGTERM and SIGKILL when a kernel is ended.
    kill_grace: float = attrs.field(default=1.0, validator=_not_negative)
    #: Extra environment variables for every kernel.
    kernel_env: dict[str, str] = attrs.Factory(dict)

    def replace(self, **changes: Any) -> ServerConfig:
        return attrs.evolve(self, **changes)

    def kernel_environment(self) -> dict[str, str]:
        """The scrubbed environment kernels start with."""
        env = {k: os.environ[k] for k in KERNEL_ENV_PASSTHROUGH if k in os.environ}
        env.setdefault("LANG", "C.UTF-8")
        env["HOME"] = "."  # the kernel's own working directory
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.kernel_env)
        return env


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file's ``[cellmux]`` table (or its top level).

    @raise ConfigError: if the file cannot be read or names unknown keys.
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    data = data.get("cellmux", data)
    known = {a.name for a in attrs.fields(ServerConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown settings in {path}: {', '.join(unknown)}")
    return data
