# -*- test-case-name: tests.test_kernel_python -*-
"""Kernels on another interpreter than the server's (``kernel_python``).

The nursery, and so every kernel forked from it, runs on the configured
interpreter (typically a virtual environment's ``bin/python``), so that
kernel packages are installed apart from the server's and none of the
server's own dependencies (Twisted, Autobahn, …) is importable in a kernel.

That interpreter needs ipykernel, attrs and pyseccomp (pyzmq comes with
ipykernel). cellmux's kernel side (``cellmux.kernel``, ``cellmux.protocol``
and ``cellmux.cleanup``, which import nothing else of cellmux) is copied into
the runtime directory and put on the nursery's import path: the kernel
environment needs no cellmux install, and always runs the same cellmux code
as the server.
"""

from __future__ import annotations

import os
import shutil

from twisted.internet import utils

import cellmux

__all__ = ["INSTALL", "KernelPythonError", "check_kernel_python", "kernel_library"]

#: What the nursery and its kernels import from the kernel environment.
REQUIRED_MODULES = ("ipykernel", "attrs", "zmq", "pyseccomp")

#: The parts of the cellmux package that run in the nursery and kernels.
_KERNEL_SIDE = ("__init__.py", "cleanup.py", "kernel", "protocol")


#: What to install into a kernel environment.
INSTALL = "ipykernel attrs pyseccomp"


class KernelPythonError(Exception):
    """The configured kernel interpreter cannot run kernels."""


def kernel_library(runtime_dir: str) -> str:
    """Copy cellmux's kernel side under C{runtime_dir}; return the directory
    to put on the nursery's PYTHONPATH (readable by every kernel uid)."""
    library = os.path.join(runtime_dir, "kernel-lib")
    shutil.rmtree(library, ignore_errors=True)
    source = os.path.dirname(cellmux.__file__)
    target = os.path.join(library, "cellmux")
    os.makedirs(target)
    for name in _KERNEL_SIDE:
        path = os.path.join(source, name)
        if os.path.isdir(path):
            shutil.copytree(
                path, os.path.join(target, name), ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(path, target)
    # Kernels run as other uids: they read it, nobody but the server writes it.
    for directory, _dirs, files in os.walk(library):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    return library


async def check_kernel_python(python: str, env: dict[str, str]) -> None:
    """Fail with a clear message unless C{python} can run cellmux kernels.

    @raise KernelPythonError: what is missing and how to install it.
    """
    if not os.path.isfile(python) or not os.access(python, os.X_OK):
        raise KernelPythonError(f"kernel_python {python!r} is not an executable file")
    probe = (
        "import importlib.util, sys\n"
        f"missing = [m for m in {REQUIRED_MODULES!r} if importlib.util.find_spec(m) is None]\n"
        "print(' '.join(missing)); sys.exit(1 if missing or sys.version_info < (3, 11) else 0)\n"
    )
    out, err, code = await utils.getProcessOutputAndValue(python, ("-c", probe), env=env)
    if code != 0:
        missing = out.decode(errors="replace").strip()
        if missing:
            raise KernelPythonError(
                f"kernel_python {python} cannot import {missing.replace(' ', ', ')}; "
                f"install them with: {python} -m pip install {INSTALL}"
            )
        raise KernelPythonError(
            f"kernel_python {python} does not run (Python 3.11 or newer is needed): "
            f"{err.decode(errors='replace').strip()[-500:]}"
        )
