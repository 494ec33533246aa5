# -*- test-case-name: tests.test_jupyter_status -*-
"""The server's own status messages, as Jupyter clients expect them. No I/O.

cellmux's native clients get rich states from the server (``dead`` with its
cause, then ``restarting``, then ``idle`` with ``"restarted": true``;
``unresponsive`` while the link ping goes unanswered). Jupyter clients read
the same words differently, after what a stock Jupyter Server sends:

* ``restarting`` means *the kernel died and the server restarts it*:
  JupyterLab shows "appears to have died… will restart automatically",
  drops its comms and reconnects. A stock server sends it only for an
  automatic restart; a restart the user asked for shows the new kernel's
  ``starting``, then ``idle``.
* ``dead`` means *the server gave up on this kernel*: JupyterLab disposes
  of its connection for good, so it must not be sent for a death that an
  automatic restart repairs.
* There is no ``unresponsive``: the kernel is still busy as far as a
  Jupyter client knows.

One L{StatusTranslator} per Jupyter connection follows the server-made
status messages in order (live or replayed) and says what to send instead.
Kernel-made status messages (ipykernel's busy/idle) never come here.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["StatusTranslator", "Translation"]


@attrs.frozen
class Translation:
    """What a Jupyter client gets for one server-made status message.

    @ivar status: the status content to send (None: send nothing).
    @ivar notice: text for the notebook's stderr, sent before the status
        (None: nothing to say), so the user sees why a kernel went away.
    """

    status: dict[str, Any] | None
    notice: str | None = None


def _why(content: dict[str, Any]) -> str:
    cause = content.get("cause")
    limit = content.get("limit")
    text = str(cause) if cause else "unknown cause"
    if limit:
        text += f"; it went over its {limit} limit"
    return text


@attrs.define
class StatusTranslator:
    """Native server-made status contents in, Jupyter status contents out."""

    #: A death was announced as followed by an automatic restart, which has
    #: not yet ended (in ``idle``, or ``dead`` if it failed).
    _auto_restarting: bool = False

    def translate(self, content: dict[str, Any]) -> Translation:
        state = content.get("execution_state")
        if state == "dead":
            if content.get("auto_restart") is True:
                self._auto_restarting = True
                return Translation(
                    None, f"cellmux: the kernel died ({_why(content)}); restarting it\n"
                )
            self._auto_restarting = False
            return Translation(
                {"execution_state": "dead"}, f"cellmux: the kernel died ({_why(content)})\n"
            )
        if state == "restarting":
            # Automatic: announced as a stock server does. Asked for: a
            # stock kernel's own start.
            return Translation(
                {"execution_state": "restarting" if self._auto_restarting else "starting"}
            )
        if state == "unresponsive":
            return Translation(None)
        if state == "idle":
            self._auto_restarting = False
        if not isinstance(state, str):
            return Translation(None)
        return Translation({"execution_state": state})
