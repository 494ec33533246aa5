# -*- test-case-name: tests.test_terminal_watch -*-
"""Outputs of executions as terminal text.

Text goes out as it comes. Rich outputs are shown by their ``text/plain``
form; images and PDFs are saved to files and a note names the file, since a
terminal cannot show them. Tracebacks keep the kernel's colours on a
terminal and lose them elsewhere (a pipe, an editor's output pane).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

# Only names for type checking: cellmux run's quick path renders without
# importing the client (cellmux.terminal.quick).
if TYPE_CHECKING:
    from cellmux.client import ExecutionError, Output

__all__ = ["PROMPT_GRACE", "SAVED_MIME_TYPES", "Renderer", "strip_ansi", "wants_color"]

#: Mime types saved to a file (suffix, whether the payload is base64).
SAVED_MIME_TYPES = {
    "image/png": (".png", True),
    "image/jpeg": (".jpg", True),
    "image/gif": (".gif", True),
    "image/svg+xml": (".svg", False),
    "application/pdf": (".pdf", True),
}

#: Seconds to wait before showing an input prompt. ipykernel flushes stdout
#: before it asks, but the output travels on iopub and the prompt on stdin,
#: and the kernel's pump may forward the prompt first: a short pause lets
#: pdb's listing appear above its prompt, not below it.
PROMPT_GRACE = 0.1

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """C{text} without terminal colour and cursor sequences."""
    return _ANSI.sub("", text)


def wants_color(stream: TextIO) -> bool:
    """Colours for a terminal, unless NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def default_save_dir() -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / f"cellmux-outputs-{os.getuid()}"


class Renderer:
    """Writes outputs to a terminal's stdout and stderr.

    @param save_dir: where images are saved (made on first use, mode 0700).
    """

    def __init__(
        self,
        out: TextIO,
        err: TextIO,
        *,
        color: bool | None = None,
        save_dir: Path | None = None,
    ) -> None:
        self.out = out
        self.err = err
        self.color = wants_color(out) if color is None else color
        self._save_dir = save_dir
        self._line_open = False

    @property
    def save_dir(self) -> Path:
        # Looked up on first use: tempfile costs cellmux run's start ~5 ms.
        if self._save_dir is None:
            self._save_dir = default_save_dir()
        return self._save_dir

    def _write(self, stream: TextIO, text: str) -> None:
        if not self.color:
            text = strip_ansi(text)
        if not text:
            return
        stream.write(text)
        stream.flush()
        self._line_open = not text.endswith("\n")

    def end_line(self) -> None:
        """End a line the output left open (a prompt follows)."""
        if self._line_open:
            self._write(self.out, "\n")

    def line(self, text: str, stream: TextIO | None = None) -> None:
        """Write one line of our own, on a line of its own."""
        if self._line_open:
            self._write(stream or self.out, "\n")
        self._write(stream or self.out, text + "\n")

    def output(self, output: Output, execution_count: int | None = None) -> None:
        """Show one output of an execution."""
        if output.kind == "stdout":
            self._write(self.out, output.content)
        elif output.kind == "stderr":
            self._write(self.err, output.content)
        elif output.kind == "error":
            self.error(output.content)
        elif output.kind == "result":
            count = output.raw.get("execution_count", execution_count)
            text = self.bundle(output.content)
            prefix = f"Out[{count}]: " if isinstance(count, int) else ""
            self.line(prefix + text if "\n" not in text else prefix + "\n" + text)
        elif output.kind in ("display", "update_display"):
            self.line(self.bundle(output.content))
        # clear_output: a terminal keeps what it printed.

    def error(self, error: ExecutionError) -> None:
        text = "\n".join(error.traceback) if error.traceback else str(error)
        self.line(text, self.err)

    def bundle(self, data: dict[str, Any]) -> str:
        """The text to show for a mime bundle; saves what a terminal cannot show."""
        parts: list[str] = []
        text = data.get("text/plain")
        for mime, (suffix, is_base64) in SAVED_MIME_TYPES.items():
            if mime in data:
                parts.append(self._save(mime, data[mime], suffix, is_base64))
                break
        else:
            if not isinstance(text, str):
                others = ", ".join(sorted(data)) or "nothing"
                parts.append(f"[output of type {others}, not shown in a terminal]")
        if isinstance(text, str):
            parts.insert(0, text)
        return "\n".join(parts)

    def _save(self, mime: str, payload: Any, suffix: str, is_base64: bool) -> str:
        try:
            if is_base64:
                raw = base64.b64decode(str(payload), validate=False)
            else:
                raw = str(payload).encode()
            import tempfile

            self.save_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(suffix=suffix, prefix="output-", dir=self.save_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
        except (OSError, binascii.Error, ValueError) as e:
            return f"[{mime} output could not be saved: {e}]"
        return f"[{mime} saved to {path}]"
