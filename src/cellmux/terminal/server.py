# -*- test-case-name: tests.test_terminal_run -*-
"""Which server, which token, which kernel: what every terminal command needs.

Kernel names: an editor wants "the kernel of this project" to live across
runs, so ``--kernel NAME`` maps a name the user picks to a kernel id, kept
per server URL in a small JSON state file
(``$XDG_STATE_HOME/cellmux/kernels.json``, else
``~/.local/state/cellmux/kernels.json``). A kernel id given instead of a
name is used as is. Without ``--kernel`` the name is ``default``, so
consecutive ``cellmux run`` calls and a ``cellmux console`` share one
namespace. A name whose kernel is gone gets a new kernel; a dead one is
restarted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

# The client is imported where it is used: cellmux run's quick path
# (cellmux.terminal.quick) needs none of it.
if TYPE_CHECKING:
    from cellmux.client import AsyncClient, Client, KernelModel

#: cellmux.client.DEFAULT_URL (tests/test_terminal_quick.py checks they agree).
DEFAULT_URL = "http://127.0.0.1:8800"

__all__ = [
    "DEFAULT_KERNEL_NAME",
    "EXIT_SERVER",
    "EXIT_USAGE",
    "KernelNames",
    "ServerOptions",
    "WrongSpec",
    "add_server_arguments",
    "add_spec_argument",
    "fail",
    "find_kernel",
    "open_kernel",
    "state_dir",
]

#: The kernel name used when no ``--kernel`` is given.
DEFAULT_KERNEL_NAME = "default"
#: Exit status for bad command-line input (argparse uses it too).
EXIT_USAGE = 2
#: Exit status when the server cannot be reached or refuses.
EXIT_SERVER = 3


class ServerOptions(NamedTuple):
    """Where the server is and how to authenticate."""

    url: str
    token: str | None
    #: Extra CA certificates for an https server (None: $CELLMUX_CAFILE, if set).
    cafile: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerOptions:
        url = args.server or os.environ.get("CELLMUX_URL") or DEFAULT_URL
        token = args.token or os.environ.get("CELLMUX_TOKEN") or None
        return cls(url.rstrip("/"), token, getattr(args, "cafile", None))

    def client(self) -> Client:
        from cellmux.client import Client

        return Client(self.url, token=self.token, cafile=self.cafile)

    def async_client(self) -> AsyncClient:
        from cellmux.client import AsyncClient

        return AsyncClient(self.url, self.token, cafile=self.cafile)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        metavar="URL",
        help=f"the server's URL (default: $CELLMUX_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        help="the server's token (default: $CELLMUX_TOKEN; prefer the variable: "
        "arguments are visible to every user of the machine)",
    )
    parser.add_argument(
        "--cafile",
        metavar="PEM",
        help="CA certificates to trust for an https server, e.g. its self-signed "
        "certificate (default: $CELLMUX_CAFILE)",
    )


def state_dir() -> Path:
    """Where cellmux keeps its per-user state (kernel names, console history)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "cellmux"


class KernelNames:
    """The name → kernel id map of one server, in the state file.

    A missing or unreadable file is an empty map: names are a convenience,
    and a lost name costs only a fresh kernel.
    """

    def __init__(self, url: str, path: Path | None = None) -> None:
        self.url = url
        self.path = path or state_dir() / "kernels.json"

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def names(self) -> dict[str, str]:
        """This server's names and their kernel ids."""
        entries = self._load().get(self.url)
        if not isinstance(entries, dict):
            return {}
        return {k: v for k, v in entries.items() if isinstance(v, str)}

    def get(self, name: str) -> str | None:
        return self.names().get(name)

    def set(self, name: str, kernel_id: str | None) -> None:
        """Map C{name} to C{kernel_id} (None: forget it); written atomically."""
        data = self._load()
        entries = data.get(self.url)
        entries = dict(entries) if isinstance(entries, dict) else {}
        if kernel_id is None:
            entries.pop(name, None)
        else:
            entries[name] = kernel_id
        data[self.url] = entries
        import tempfile

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".kernels-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _lookup(client: Client, kernel_id: str) -> KernelModel | None:
    from cellmux.client import HTTPError

    try:
        return client.get_kernel(kernel_id)
    except HTTPError as e:
        if e.status == 404:
            return None
        raise


def find_kernel(client: Client, names: KernelNames, spec: str) -> KernelModel | None:
    """The kernel C{spec} names (a kernel id, or a name in the state file), if it exists."""
    model = _lookup(client, spec)
    if model is None:
        kernel_id = names.get(spec)
        model = _lookup(client, kernel_id) if kernel_id else None
    return model


class WrongSpec(Exception):
    """The named kernel runs another kernel spec than the one asked for
    (not a CellmuxError: this module imports no client at import time)."""


def open_kernel(
    client: Client, names: KernelNames, spec: str | None, kernel_spec: str | None = None
) -> KernelModel:
    """The kernel to use for C{spec}: found, restarted if dead, or created and named.

    A new kernel is of C{kernel_spec}; without one, of the spec the name
    itself names (``--kernel bash`` starts a bash kernel), else the
    server's default. Notes on stderr what it did beyond finding one, so
    that the user learns the id of a kernel made for them.

    @raise WrongSpec: if the kernel found runs another spec than C{kernel_spec}.
    @raise CellmuxError: if the server cannot be reached or refuses.
    """
    name = spec or DEFAULT_KERNEL_NAME
    model = find_kernel(client, names, name)
    if model is not None:
        if kernel_spec is not None and model.name not in (None, kernel_spec):
            raise WrongSpec(
                f"kernel {name!r} runs {model.name}, not {kernel_spec}; "
                "name another --kernel for a new one"
            )
        if model.execution_state == "dead":
            print(
                f"cellmux: kernel {model.id} had died ({model.raw.get('reason', 'unknown')}); "
                "restarting it",
                file=sys.stderr,
            )
            model = client.restart_kernel(model.id)
        return model
    if kernel_spec is None and spec is not None and spec in client.kernel_specs():
        kernel_spec = spec
    model = client.create_kernel(kernel_spec)
    names.set(name, model.id)
    of = "" if model.name in (None, "python3") else f" ({model.name})"
    print(f"cellmux: started kernel {model.id}{of} as {name!r}", file=sys.stderr)
    return model


def add_spec_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spec",
        metavar="SPEC",
        help="the kernel spec (python3, bash, ir, …) of a kernel this command starts "
        "(default: the --kernel name if a spec has it, else python3)",
    )


def fail(message: str, status: int = EXIT_SERVER) -> int:
    """Print C{message} as the command's error and return the exit status."""
    print(f"cellmux: {message}", file=sys.stderr)
    return status
