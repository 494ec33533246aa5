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
from .protocol.nursery import DEFAULT_KILL_GRACE, DEFAULT_UID_RANGE

__all__ = [
    "KERNEL_ENV_PASSTHROUGH",
    "LOG_FORMATS",
    "ConfigError",
    "NamedTokenSetting",
    "ServerConfig",
    "load_config_file",
    "named_tokens",
]

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


def _nice(_instance: object, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not -20 <= value <= 19:
        raise ConfigError(f"{attribute.name} must be an integer from -20 to 19, not {value!r}")


def _optional_directory(_instance: object, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not (isinstance(value, str) and os.path.isdir(value)):
        raise ConfigError(f"{attribute.name} must be an existing directory, not {value!r}")


def _uid_range(_instance: object, attribute: attrs.Attribute, value: tuple) -> None:
    ints = len(value) == 2 and all(isinstance(v, int) for v in value)
    if not ints or not 0 < value[0] <= value[1]:
        raise ConfigError(f"{attribute.name} must be [first, last] uids above 0, not {value!r}")


def _front_id(_instance: object, attribute: attrs.Attribute, value: str | None) -> None:
    from .server.fronts import validate_front_id

    if value is not None:
        try:
            validate_front_id(value)
        except ValueError as e:
            raise ConfigError(str(e)) from None


#: The formats of the server's log (``log_format``).
LOG_FORMATS = ("text", "json")


def _one_of(value: object, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def _networks(_instance: object, attribute: attrs.Attribute, value: tuple) -> None:
    import ipaddress

    for item in value:
        try:
            if not isinstance(item, str):
                raise TypeError(item)
            ipaddress.ip_network(item, strict=False)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{attribute.name}: {item!r} is not an IP address or network (e.g. 10.0.0.0/8)"
            ) from None


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
    #: Seconds between handing out a pool kernel and forking its
    #: replacement, so the new kernel's first cells have the CPU (forking
    #: and initialising a kernel takes ~100 ms of it). An emptied pool is
    #: refilled at once.
    pool_refill_delay: float = attrs.field(default=0.25, validator=_not_negative)
    #: Most ready kernels the pool grows to while creates come fast (it
    #: keeps about twice what is taken while one kernel starts).
    pool_max: int = attrs.field(default=16, validator=_not_negative)
    #: Seconds without a create before the pool shrinks back to pool_size.
    pool_idle_shrink: float = attrs.field(default=60.0, validator=_positive)
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
    kill_grace: float = attrs.field(default=DEFAULT_KILL_GRACE, validator=_not_negative)
    #: Bytes of recent frames each kernel keeps for clients that reconnect
    #: or fall behind (the replay log).
    replay_bytes: int = attrs.field(default=8 * 1024 * 1024, validator=_positive)
    #: Seconds an input request waits for its client to come back; then the
    #: kernel's input() raises EOFError with a note on stderr.
    stdin_timeout: float = attrs.field(default=300.0, validator=_positive)
    #: Seconds without an answer to the link ping before a kernel is shown
    #: as unresponsive (e.g. C code holding the GIL).
    unresponsive_after: float = attrs.field(default=2.0, validator=_positive)
    #: Seconds between link pings of an idle kernel (busy ones are pinged
    #: twice a second): each ping wakes the kernel, so idle ones rest.
    idle_ping_interval: float = attrs.field(default=10.0, validator=_positive)
    #: Nice value of the server's autogroup when it leads its session
    #: (server/priority.py): the reactor gets a core before the kernels.
    server_nice: int = attrs.field(default=0, validator=_nice)
    #: Seconds a kernel with no client attached may stay idle before it is
    #: ended (0: never).
    idle_timeout: float = attrs.field(default=3600.0, validator=_not_negative)
    #: Seconds a kernel may live at all (0: no limit).
    max_lifetime: float = attrs.field(default=0.0, validator=_not_negative)
    #: Start a fresh kernel under the same id when a kernel's process dies.
    auto_restart: bool = False
    #: Restart kernels that a Jupyter client has attached to when they die,
    #: as a stock Jupyter Server does (JupyterLab gives a dead kernel up).
    jupyter_auto_restart: bool = True
    #: Browser origins (regular expressions, matched against the whole
    #: ``scheme://host[:port]``) that may open websockets besides the
    #: server's own; e.g. ``https://docs\.example\.org``.
    allow_origins: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: Where the server records its kernels so that the next start can end
    #: any it left behind (None: ~/.local/state/cellmux).
    state_dir: str | None = None
    #: Extra environment variables for every kernel.
    kernel_env: dict[str, str] = attrs.Factory(dict)
    #: Offer Python kernels' memory to the kernel's same-page merging (KSM):
    #: less memory per kernel, at the cost of a timing channel between
    #: kernels (docs/security.md); the operator also turns ksmd on.
    kernel_page_merging: bool = False
    #: A directory every kernel sees (e.g. the notebooks' folder), in which a
    #: Jupyter client's working directory is honoured (None: kernels start
    #: in their private directories whatever the client asks).
    shared_root: str | None = attrs.field(default=None, validator=_optional_directory)
    #: Let kernels write in shared_root (False: it is mounted read-only in
    #: their sandbox, when the server runs as root).
    shared_root_writable: bool = False
    #: The Python the nursery and every kernel run on, e.g. a virtual
    #: environment's ``bin/python`` (None: the server's own interpreter).
    kernel_python: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str))
    )
    #: First and last uid (and gid) given to kernels when the server runs as
    #: root, one per kernel; no /etc/passwd entries are needed. Give each
    #: server on a machine its own range.
    kernel_uid_range: tuple[int, int] = attrs.field(
        default=DEFAULT_UID_RANGE, converter=tuple, validator=_uid_range
    )
    #: Let kernels reach the network (False: each kernel has its own network
    #: namespace with only loopback, when the server runs as root).
    kernel_network: bool = False
    #: Per-kernel limits (0: none). CPU seconds each kernel process may use
    #: (SIGXCPU, then SIGKILL 2 CPU seconds later); the kernel is ended.
    limit_cpu_seconds: int = attrs.field(default=3600, validator=_not_negative)
    #: Memory in MiB: cgroup v2 memory.max where the machine delegates it
    #: (the kernel is ended), else RLIMIT_AS per process (allocations fail
    #: with MemoryError). Address space, not resident memory: keep it generous.
    limit_memory_mb: int = attrs.field(default=4096, validator=_not_negative)
    #: Processes and threads of one kernel (RLIMIT_NPROC; only with per-kernel
    #: uids, i.e. when the server runs as root).
    limit_processes: int = attrs.field(default=256, validator=_not_negative)
    #: Open file descriptors per kernel process (RLIMIT_NOFILE).
    limit_open_files: int = attrs.field(default=1024, validator=_not_negative)
    #: Largest file a kernel may write, in MiB (RLIMIT_FSIZE: writes fail).
    limit_file_size_mb: int = attrs.field(default=1024, validator=_not_negative)
    #: MiB a kernel's working directory and its /tmp may hold, checked every
    #: second; a kernel over it is ended.
    limit_disk_mb: int = attrs.field(default=2048, validator=_not_negative)
    #: Where permalinks live: a SQLite file path (or ``sqlite:///path``), or a
    #: URL a store plugin handles (``postgresql://…``). Empty: a SQLite file in
    #: the runtime directory. See docs/storage.md.
    database: str = ""
    #: Seconds one database call may take before its request gets a 503.
    database_timeout: float = attrs.field(default=5.0, validator=_positive)
    #: This front's id among several behind one proxy (1 to 8 hex digits):
    #: the ids it mints carry it so the proxy routes by them (docs/scaling.md,
    #: Several fronts). None: one server alone, ids as before.
    front_id: str | None = attrs.field(default=None, validator=_front_id)
    #: With a front_id: seconds between re-reads of the stored credentials
    #: (shares, logins, capabilities made or revoked on other fronts).
    credential_refresh: float = attrs.field(default=5.0, validator=_positive)
    #: Largest request body (an upload) the server takes, in bytes; bigger
    #: bodies are dropped as they arrive and answered with 413.
    max_upload_size: int = attrs.field(default=100 * 1024 * 1024, validator=_positive)
    #: Most bytes of files one kernel's directory may hold after an upload.
    kernel_quota: int = attrs.field(default=1024 * 1024 * 1024, validator=_positive)
    #: Longest wall time, in seconds, one ``POST /service`` run may take.
    service_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: Named tokens: ``{NAME: {"token_hash": "sha256:<hex>", "max_kernels": N}}``
    #: (``[tokens.NAME]`` tables in the file). Each sees and controls only
    #: the kernels it created, at most N at once. See docs/security.md.
    tokens: dict[str, Any] = attrs.field(factory=dict, validator=lambda i, a, v: named_tokens(v))
    #: Seconds a login cookie lasts (0: until the browser closes; logins
    #: are still kept in the database then).
    login_lifetime: float = attrs.field(default=30 * 24 * 3600.0, validator=_not_negative)
    #: Variable names (fnmatch patterns such as ``MY_*``) a create request's
    #: ``env`` may set in its kernel; any other name is refused with 400.
    kernel_env_allow: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: Python code every new kernel runs (silently) before its first cell.
    kernel_startup: str = ""
    #: Let a create request carry its own ``startup`` code.
    allow_request_startup: bool = False
    #: Public mode: anonymous visitors may run embedded cells and open
    #: permalinks, each on a kernel of their own (docs/browser.md).
    public: bool = False
    #: Public mode: kernels one client address may have at once.
    public_kernels_per_address: int = attrs.field(default=2, validator=_positive)
    #: Public mode: kernel and permalink requests one address may make per minute.
    public_requests_per_minute: int = attrs.field(default=30, validator=_positive)
    #: Public mode: seconds a visitor's kernel may stay idle with no client
    #: attached (the page was closed) before it is ended.
    public_idle_timeout: float = attrs.field(default=300.0, validator=_positive)
    #: Public mode: limits of anonymous kernels (lower than the limit_* ones).
    public_limit_cpu_seconds: int = attrs.field(default=60, validator=_positive)
    public_limit_memory_mb: int = attrs.field(default=512, validator=_positive)
    public_limit_file_size_mb: int = attrs.field(default=16, validator=_positive)
    public_limit_open_files: int = attrs.field(default=128, validator=_positive)
    public_limit_processes: int = attrs.field(default=16, validator=_positive)

    #: PEM certificate (chain) and unencrypted private key: with both, the
    #: server speaks TLS itself (https and wss on ``port``; server/tls.py).
    tls_cert: str | None = None
    tls_key: str | None = None
    #: ``Strict-Transport-Security: max-age`` in seconds on every response
    #: that came over TLS (directly or from a trusted proxy); 0: no header.
    hsts_max_age: int = attrs.field(default=31536000, validator=_not_negative)
    #: Peer addresses or networks (``"127.0.0.1"``, ``"10.0.0.0/8"``) whose
    #: ``X-Forwarded-For``/``-Proto``/``-Host`` headers are believed
    #: (server/proxy.py); everybody else's are ignored.
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=_networks)
    #: A token that may read ``/metrics`` (besides the server token), for a
    #: Prometheus that must not hold the owner's token (None: only the owner).
    metrics_token: str | None = None
    #: ``text`` (human lines) or ``json`` (one JSON object per line) for
    #: ``cellmux serve``'s log on stderr.
    log_format: str = attrs.field(
        default="text", validator=lambda _i, _a, v: _one_of(v, "log_format", LOG_FORMATS)
    )

    #: Kernel hosts (docs/scaling.md): the ZeroMQ endpoint ``cellmux host``
    #: processes connect to, e.g. ``tcp://0.0.0.0:8801`` (empty: none).
    hosts_listen: str = ""
    #: The front's CURVE secret key file (``cellmux keys new``).
    hosts_secret_key: str | None = None
    #: Directory of the authorised hosts' public key files (``*.key``).
    hosts_authorized_dir: str | None = attrs.field(default=None, validator=_optional_directory)
    #: Whether this server runs kernels itself, besides its hosts.
    local_kernels: bool = True
    #: Seconds without a heartbeat after which a kernel host is lost.
    host_timeout: float = attrs.field(default=3.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both tls_cert and tls_key (--tls-cert and --tls-key)")
        if self.hosts_listen:
            if not self.hosts_listen.startswith("tcp://"):
                raise ConfigError(
                    f"hosts_listen must be a tcp:// endpoint, not {self.hosts_listen!r}"
                )
            if not self.hosts_secret_key or not self.hosts_authorized_dir:
                raise ConfigError(
                    "hosts_listen needs hosts_secret_key and hosts_authorized_dir "
                    "(--hosts-secret-key, --hosts-authorized-dir)"
                )
        elif not self.local_kernels:
            raise ConfigError("local_kernels = false needs kernel hosts (hosts_listen)")
        if self.public and self.kernel_page_merging:
            # Strangers' kernels could probe each other's memory by timing.
            raise ConfigError(
                "kernel_page_merging cannot be on in public mode (docs/security.md, Page merging)"
            )

    @property
    def tls(self) -> bool:
        """Whether the server speaks TLS itself."""
        return bool(self.tls_cert and self.tls_key)

    def replace(self, **changes: Any) -> ServerConfig:
        return attrs.evolve(self, **changes)

    def sandbox_settings(self) -> dict[str, Any]:
        """The nursery's ``sandbox`` settings (see cellmux.kernel.sandbox)."""
        return {
            "uid_range": list(self.kernel_uid_range),
            "network": self.kernel_network,
            "shared_root": os.path.realpath(self.shared_root) if self.shared_root else None,
            "shared_root_writable": self.shared_root_writable,
            "limits": {
                "cpu_seconds": self.limit_cpu_seconds,
                "memory_mb": self.limit_memory_mb,
                "processes": self.limit_processes,
                "open_files": self.limit_open_files,
                "file_size_mb": self.limit_file_size_mb,
                "disk_mb": self.limit_disk_mb,
            },
        }

    def kernel_environment(self) -> dict[str, str]:
        """The scrubbed environment kernels start with."""
        env = {k: os.environ[k] for k in KERNEL_ENV_PASSTHROUGH if k in os.environ}
        env.setdefault("LANG", "C.UTF-8")
        env["HOME"] = "."  # the kernel's own working directory
        env["PYTHONUNBUFFERED"] = "1"
        # debugpy (imported with ipykernel) warns about frozen modules on
        # every start; the warning says nothing to a cellmux operator.
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        if self.kernel_python:
            path = env.get("PATH", os.defpath)
            env.update(self._kernel_python_environment(self.kernel_python, path))
        env.update(self.kernel_env)
        return env

    def _kernel_python_environment(self, kernel_python: str, path: str) -> dict[str, str]:
        # ``!pip install`` and ``!python`` in a kernel use the kernels'
        # environment, not the server's.
        bin_dir = os.path.dirname(os.path.abspath(kernel_python))
        env = {"PATH": os.pathsep.join([bin_dir, path])}
        venv = os.path.dirname(bin_dir)
        env["VIRTUAL_ENV"] = venv if os.path.exists(os.path.join(venv, "pyvenv.cfg")) else ""
        return env


@attrs.frozen
class NamedTokenSetting:
    """One ``[tokens.NAME]`` table."""

    name: str
    #: The token's SHA-256 digest (32 bytes).
    digest: bytes
    max_kernels: int


def named_tokens(value: Any) -> list[NamedTokenSetting]:
    """The ``tokens`` setting, checked.

    @raise ConfigError: for a malformed table, hash or quota.
    """
    if not isinstance(value, dict):
        raise ConfigError("tokens must be a table of [tokens.NAME] tables")
    found = []
    seen: set[bytes] = set()
    for name, table in value.items():
        if (
            not isinstance(name, str)
            or not name
            or not name.replace("-", "").replace("_", "").isalnum()
        ):
            raise ConfigError(f"token name {name!r}: use letters, digits, - and _")
        if not isinstance(table, dict):
            raise ConfigError(f"tokens.{name} must be a table")
        unknown = sorted(set(table) - {"token_hash", "max_kernels"})
        if unknown:
            raise ConfigError(f"tokens.{name}: unknown settings {', '.join(unknown)}")
        raw = table.get("token_hash")
        hexdigest = (
            raw[len("sha256:") :] if isinstance(raw, str) and raw.startswith("sha256:") else None
        )
        try:
            digest = bytes.fromhex(hexdigest) if hexdigest else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError(
                f"tokens.{name}.token_hash must be sha256:<64 hex digits> "
                "(cellmux token new NAME prints one)"
            )
        if digest in seen:
            raise ConfigError(f"tokens.{name}: the same token_hash as another token")
        seen.add(digest)
        quota = table.get("max_kernels", 10)
        if isinstance(quota, bool) or not isinstance(quota, int) or quota < 1:
            raise ConfigError(f"tokens.{name}.max_kernels must be a whole number above 0")
        found.append(NamedTokenSetting(name, digest, quota))
    return found


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
