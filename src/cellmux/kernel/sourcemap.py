# -*- test-case-name: tests.test_terminal_run -*-
"""Code run "as lines A-B of file F": tracebacks, inspect and pdb see F.

An editor sends a selection of a file with ``execute_request`` metadata
``{"cellmux": {"filename": F, "first_line": A}}`` (docs/protocol.md,
section 4). Theory of operation, inside the kernel:

1. ``shell.transform_cell`` (IPython's magics and friends) runs as usual,
   then the result is prefixed with A-1 newlines. Every line number the
   compiler assigns is then A-1 higher, SyntaxErrors included, with no AST
   rewriting. Padding after the transformation matters: IPython's own
   transformers strip leading blank lines.
2. ``shell.compile.cache`` (which names the code and registers it with
   ``linecache``) names it F instead of ``/tmp/ipykernel_…/123.py``, and
   registers the lines the kernel has seen of F so far: each selection is
   written over its own lines, so ``inspect.getsource`` of a function sent
   earlier still works after another part of the file was run. F is left out
   of IPython's "Cell In[n]" map, so tracebacks print the file name.
3. ``shell.run_ast_nodes`` runs the statements as ONE code object (IPython
   makes one per top-level statement), so that pdb's ``next`` goes from one
   line of the file to the next instead of into IPython. A final expression
   is displayed as usual.

The kernel usually cannot read F (it runs elsewhere, as another user): what
it knows of F is only what was sent. Lines never sent read as empty.

A request without the key runs exactly as in stock ipykernel. A malformed
key fails that request with a clear error and nothing else.
"""

from __future__ import annotations

import ast
import inspect
import linecache
from typing import Any

import attrs

__all__ = ["METADATA_KEY", "SourceFiles", "SourceRef", "SourceRefError", "install", "shifted"]

#: The execute_request metadata key read here.
METADATA_KEY = "cellmux"
#: Longest accepted file name (Linux's PATH_MAX).
MAX_FILENAME = 4096
#: Highest accepted first line. Padding and the line table cost about 9
#: bytes per line, so a bound keeps a typo from eating the kernel's memory;
#: source files that long do not exist in practice.
MAX_FIRST_LINE = 1_000_000


class SourceRefError(ValueError):
    """The request's ``cellmux`` metadata is malformed."""


def _check_filename(instance: object, attribute: object, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise SourceRefError("cellmux metadata: filename must be a non-empty string")
    if len(value) > MAX_FILENAME or "\0" in value or "\n" in value:
        raise SourceRefError(
            f"cellmux metadata: filename must be at most {MAX_FILENAME} characters "
            "with no NUL or newline"
        )


def _check_first_line(instance: object, attribute: object, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_FIRST_LINE:
        raise SourceRefError(
            f"cellmux metadata: first_line must be an integer from 1 to {MAX_FIRST_LINE}, "
            f"not {value!r}"
        )


@attrs.frozen
class SourceRef:
    """Where the code of one request comes from: its file and first line (1-based)."""

    filename: str = attrs.field(validator=_check_filename)
    first_line: int = attrs.field(default=1, validator=_check_first_line)

    @classmethod
    def from_metadata(cls, metadata: Any) -> SourceRef | None:
        """The reference in a request's metadata, or None if it carries none.

        @raise SourceRefError: if the ``cellmux`` key is there but malformed.
        """
        if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
            return None
        value = metadata[METADATA_KEY]
        if not isinstance(value, dict):
            raise SourceRefError("cellmux metadata must be an object")
        filename = value.get("filename")
        if not isinstance(filename, str):
            raise SourceRefError("cellmux metadata: filename must be a non-empty string")
        return cls(filename, value.get("first_line", 1))


def shifted(code: str, ref: SourceRef) -> str:
    """C{code} padded so that its first line compiles as line C{ref.first_line}."""
    return "\n" * (ref.first_line - 1) + code


class SourceFiles:
    """What the kernel has seen of each file, line by line."""

    def __init__(self) -> None:
        self._lines: dict[str, list[str]] = {}

    def record(self, ref: SourceRef, code: str) -> list[str]:
        """Write C{code} over its lines of C{ref.filename}; return all known lines."""
        lines = self._lines.setdefault(ref.filename, [])
        new = [line + "\n" for line in code.splitlines()]
        start = ref.first_line - 1
        if len(lines) < start + len(new):
            lines.extend("\n" for _ in range(start + len(new) - len(lines)))
        lines[start : start + len(new)] = new
        return lines

    def register(self, ref: SourceRef, code: str) -> str:
        """Record C{code} and make C{linecache} serve the file; returns its name."""
        lines = self.record(ref, code)
        # mtime None: linecache.checkcache never evicts the entry, even when a
        # file of that name exists on the kernel's machine.
        linecache.cache[ref.filename] = (sum(map(len, lines)), None, list(lines), ref.filename)
        return ref.filename


def install(kernel: Any) -> SourceFiles:
    """Make C{kernel} (an ipykernel IPythonKernel) honour the ``cellmux`` metadata.

    Wraps three methods on the instances (``shell.transform_cell``,
    ``shell.compile.cache``, ``shell.run_ast_nodes``), each of which does
    exactly what it did before for a request without the key. Call once,
    after the kernel app is initialised.
    """
    shell = kernel.shell
    compiler = shell.compile
    files = SourceFiles()
    transform_cell = shell.transform_cell
    cache = compiler.cache

    def current_ref() -> SourceRef | None:
        parent = kernel.get_parent("shell") or {}
        if parent.get("header", {}).get("msg_type") != "execute_request":
            return None
        return SourceRef.from_metadata(parent.get("metadata"))

    def transform_with_ref(raw_cell: str) -> str:
        # A SourceRefError raised here becomes the request's error reply:
        # ipykernel and IPython report transform failures as the cell's error.
        ref = current_ref()
        transformed = transform_cell(raw_cell)
        return transformed if ref is None else shifted(transformed, ref)

    def cache_with_ref(transformed_code: str, number: int = 0, raw_code: str | None = None) -> str:
        try:
            ref = current_ref()
        except SourceRefError:
            ref = None  # already reported by transform_with_ref
        if ref is None:
            return cache(transformed_code, number, raw_code)
        if raw_code is None:
            raw_code = transformed_code[ref.first_line - 1 :]
        return files.register(ref, raw_code)

    run_ast_nodes = shell.run_ast_nodes

    async def run_nodes_with_ref(
        nodelist: list[ast.stmt],
        cell_name: str,
        interactivity: str = "last_expr",
        compiler: Any = compile,
        result: Any = None,
    ) -> bool | None:
        # IPython compiles each top-level statement on its own, so pdb's
        # "next" on the last line of one leaves for IPython's internals. Code
        # from a file runs as one code object, like the file itself would;
        # a final expression is still displayed the usual way.
        try:
            ref = current_ref()
        except SourceRefError:
            ref = None
        tail = nodelist[-1:] if nodelist and isinstance(nodelist[-1], ast.Expr) else []
        body = nodelist[: len(nodelist) - len(tail)]
        if ref is None or interactivity != "last_expr" or len(body) < 2:
            return await run_ast_nodes(nodelist, cell_name, interactivity, compiler, result)
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if shell.autoawait else 0
        try:
            with compiler.extra_flags(flags):
                code = compiler(ast.Module(body, []), cell_name, "exec")
        except Exception:
            # Let IPython compile and report it the way it always does.
            return await run_ast_nodes(nodelist, cell_name, interactivity, compiler, result)
        is_async = bool(code.co_flags & inspect.CO_COROUTINE)
        if await shell.run_code(code, result, async_=is_async):
            return True
        if tail:
            return await run_ast_nodes(tail, cell_name, interactivity, compiler, result)
        return False

    shell.transform_cell = transform_with_ref
    compiler.cache = cache_with_ref
    shell.run_ast_nodes = run_nodes_with_ref
    return files
