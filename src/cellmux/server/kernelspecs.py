# -*- test-case-name: tests.test_kernelspecs -*-
"""Which kernels the server offers: its own Python kernel and every installed kernelspec.

``python3`` is the forked fast path: stock ipykernel from the nursery's warm
pool. Every other kernelspec that jupyter_client finds where the server runs
(``jupyter kernelspec list``: the Jupyter data directories, ``JUPYTER_PATH``)
is offered too and started cold, in the same sandbox, behind the adaptor
(L{cellmux.kernel.adaptor}). A kernelspec named ``python3`` on disk is
shadowed by the server's own.

The list is read at start and again on demand (listing the specs, or asking
for a name not yet known), at most once per L{REFRESH_AFTER} seconds, so a
kernelspec installed while the server runs is offered without a restart.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.logger import Logger

__all__ = ["DEFAULT_SPEC", "KernelSpec", "KernelSpecs", "discover", "reached_paths"]

#: The server's own kernel, and the default.
DEFAULT_SPEC = "python3"

#: Jupyter messaging version of stock ipykernel 6.29+.
_PROTOCOL_VERSION = "5.5"

#: Seconds during which the list read last is reused.
REFRESH_AFTER = 1.0

#: Longest name accepted (jupyter_client allows letters, digits, ``-._``).
MAX_NAME = 200


@attrs.frozen
class KernelSpec:
    """One kernel the server can start."""

    name: str
    display_name: str
    language: str
    #: The kernelspec's own argv (empty for the forked Python kernel).
    argv: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    env: Mapping[str, str] = attrs.Factory(dict)
    interrupt_mode: str = "signal"
    metadata: Mapping[str, Any] = attrs.Factory(dict)
    #: The kernelspec's directory (its logos); None for none.
    resource_dir: str | None = None
    #: Forked from the nursery (python3), not started through the adaptor.
    forked: bool = False

    def model(self) -> dict[str, Any]:
        """The ``spec`` of Jupyter's kernelspec model.

        ``argv`` is empty: only the server starts kernels, and a client could
        not run the server's command lines anyway.
        """
        return {
            "argv": [],
            "display_name": self.display_name,
            "language": self.language,
            "interrupt_mode": self.interrupt_mode,
            "env": {},
            "metadata": dict(self.metadata),
            **({"kernel_protocol_version": _PROTOCOL_VERSION} if self.forked else {}),
        }

    def launch(self) -> dict[str, Any] | None:
        """What the nursery needs to start it (None: fork a Python kernel)."""
        if self.forked:
            return None
        return {
            "name": self.name,
            "argv": list(self.argv),
            "env": dict(self.env),
            "interrupt_mode": self.interrupt_mode,
            "resource_dir": self.resource_dir or "",
        }


def reached_paths(spec: KernelSpec, search_path: str | None = None) -> set[str]:
    """The directories a kernel of C{spec} must reach in the sandbox: its
    kernelspec directory, and where its program lives (the prefix above a
    ``bin`` directory, so that a virtual environment comes whole)."""
    found = set()
    if spec.resource_dir:
        found.add(os.path.realpath(spec.resource_dir))
    if spec.argv:
        program = spec.argv[0].replace("{resource_dir}", spec.resource_dir or "")
        located = shutil.which(program, path=search_path) if os.sep not in program else program
        if located and os.path.isabs(located):
            directory = os.path.dirname(os.path.realpath(located))
            found.add(
                os.path.dirname(directory) if os.path.basename(directory) == "bin" else directory
            )
    return found


def _ipykernel_resources() -> str | None:
    from importlib import resources

    try:
        path = str(resources.files("ipykernel") / "resources")
    except ModuleNotFoundError:
        return None
    return path if os.path.isdir(path) else None


def builtin_python() -> KernelSpec:
    """The server's own Python kernel (forked; ipykernel's logos)."""
    return KernelSpec(
        name=DEFAULT_SPEC,
        display_name="Python 3 (cellmux)",
        language="python",
        interrupt_mode="signal",
        # JupyterLab offers its debugger only for specs that say so; the
        # kernels speak the debug protocol on control (docs/jupyter.md).
        metadata={"debugger": True},
        resource_dir=_ipykernel_resources(),
        forked=True,
    )


def _from_jupyter(name: str, resource_dir: str, spec: Mapping[str, Any]) -> KernelSpec:
    """A KernelSpec from a kernel.json's contents. @raise ValueError: if unusable."""
    argv = spec.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a non-empty list of strings")
    env = spec.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ValueError("env must map strings to strings")
    mode = spec.get("interrupt_mode") or "signal"
    if mode not in ("signal", "message"):
        raise ValueError(f"unknown interrupt_mode {mode!r}")
    metadata = spec.get("metadata") or {}
    return KernelSpec(
        name=name,
        display_name=str(spec.get("display_name") or name),
        language=str(spec.get("language") or ""),
        argv=argv,
        env=env,
        interrupt_mode=mode,
        metadata=metadata if isinstance(metadata, dict) else {},
        resource_dir=resource_dir,
    )


def discover(warn: Callable[[str, str], None]) -> dict[str, KernelSpec]:
    """Every installed kernelspec jupyter_client finds, by name (python3 not
    included); C{warn(name, why)} hears about those that cannot be used."""
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager()
    # Only what is installed: not the kernel of the interpreter running
    # the server (that is ours, forked).
    manager.ensure_native_kernel = False
    found: dict[str, KernelSpec] = {}
    try:
        directories = manager.find_kernel_specs()
    except Exception as e:  # unreadable data directories: offer ours only
        warn("*", f"cannot list kernelspecs: {e}")
        return found
    for name, directory in sorted(directories.items()):
        if name == DEFAULT_SPEC or len(name) > MAX_NAME:
            continue
        try:
            spec = manager.get_kernel_spec(name)
            found[name] = _from_jupyter(name, directory, spec.to_dict())
        except Exception as e:  # a broken kernel.json must not hide the others
            warn(name, str(e))
    return found


class KernelSpecs:
    """The kernels on offer, read again on demand (see the module)."""

    log = Logger()

    def __init__(
        self,
        clock: Any,
        find: Callable[[Callable[[str, str], None]], dict[str, KernelSpec]] = discover,
    ) -> None:
        """@param find: reads the installed kernelspecs (L{discover})."""
        self._clock = clock
        self._find = find
        self._python = builtin_python()
        self._specs: dict[str, KernelSpec] = {}
        self._read_at: float | None = None
        self._warned: set[tuple[str, str]] = set()

    def _warn(self, name: str, why: str) -> None:
        if (name, why) not in self._warned:  # once per problem, not per read
            self._warned.add((name, why))
            self.log.warn("kernelspec {name} is not offered: {why}", name=name, why=why)

    def refresh(self, force: bool = False) -> None:
        now = self._clock.seconds()
        if not force and self._read_at is not None and now - self._read_at < REFRESH_AFTER:
            return
        self._read_at = now
        self._specs = self._find(self._warn)

    def get(self, name: str) -> KernelSpec | None:
        """The spec called C{name}, looking again on disk if it is not known."""
        if name == DEFAULT_SPEC:
            return self._python
        spec = self._specs.get(name)
        if spec is None:
            self.refresh()
            spec = self._specs.get(name)
        return spec

    def paths(self, search_path: str | None = None) -> list[str]:
        """What kernels of the specs on offer now must reach (see
        L{reached_paths}); the nursery makes them reachable in the sandbox."""
        found: set[str] = set()
        for spec in self.all().values():
            if not spec.forked:
                found |= reached_paths(spec, search_path)
        return sorted(found)

    def all(self) -> dict[str, KernelSpec]:
        """Every spec on offer, python3 first (read again if stale)."""
        self.refresh()
        return {DEFAULT_SPEC: self._python, **self._specs}
