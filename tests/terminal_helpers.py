"""Driving the terminal commands: as subprocesses, and through a real pty (pexpect)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect

# Colour, cursor movement, modes, and the other escapes prompt_toolkit writes.
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\r")


def plain(text: str) -> str:
    """What a terminal shows, roughly: the text without escape sequences."""
    return _ESCAPES.sub("", text)


def cellmux_env(server, state_dir: Path, **extra: str) -> dict[str, str]:
    """The environment a user of this server would have."""
    env = dict(os.environ)
    env.update(
        CELLMUX_URL=server.url,
        CELLMUX_TOKEN=server.token,
        XDG_STATE_HOME=str(state_dir),
        TERM="xterm",
        # pexpect does not answer prompt_toolkit's cursor position requests.
        PROMPT_TOOLKIT_NO_CPR="1",
        # Images the commands save by default go under the test's own dir.
        TMPDIR=str(state_dir.parent),
        **extra,
    )
    env.pop("NO_COLOR", None)
    return env


def cellmux(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``cellmux ARGS`` to the end (no terminal) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "cellmux", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class Terminal:
    """A command running in a real pseudo-terminal, read as plain text.

    C{expect} waits for a pattern in what arrived since the last match, with
    the escape sequences removed, so it does not care how prompt_toolkit
    chose to paint the screen.
    """

    def __init__(
        self,
        env: dict[str, str],
        *args: str,
        timeout: float = 60,
        module: str = "cellmux",
        sigint: str = "default",
    ) -> None:
        """@param sigint: how the command gets SIGINT: C{"default"}, as a
        terminal's shell gives it (whatever the test run inherited), or
        C{"ignored"} or C{"blocked"}, as a background job of a script (or a
        process forked with the signal masked) may."""

        def preexec() -> None:
            signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.SIG_DFL)
            how = signal.SIG_BLOCK if sigint == "blocked" else signal.SIG_UNBLOCK
            signal.pthread_sigmask(how, {signal.SIGINT})

        self.child = pexpect.spawn(
            sys.executable,
            ["-m", module, *args],
            env=env,
            encoding="utf-8",
            codec_errors="replace",
            dimensions=(40, 120),
            timeout=timeout,
            preexec_fn=preexec,
        )
        self.timeout = timeout
        self.raw = ""
        self.seen = 0  # index into plain(raw) of what was already matched

    @property
    def text(self) -> str:
        return plain(self.raw)

    def _read(self, wait: float) -> None:
        with contextlib.suppress(pexpect.TIMEOUT):
            self.raw += self.child.read_nonblocking(65536, timeout=wait)

    def expect(self, pattern: str, timeout: float | None = None) -> re.Match:
        """Wait for C{pattern} (a regex) in the new plain text; return the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        ended = False
        while True:
            match = regex.search(self.text, self.seen)
            if match:
                self.seen = match.end()
                return match
            if ended or time.monotonic() > deadline:
                why = "before the command ended" if ended else "in time"
                raise AssertionError(
                    f"{pattern!r} not seen {why}; the terminal shows:\n{self.text[-3000:]}"
                )
            try:
                self._read(0.2)
            except pexpect.EOF:
                ended = True

    def settle(self, quiet: float = 0.5, timeout: float = 30) -> None:
        """Wait until new output came and then nothing for C{quiet} seconds."""
        deadline = time.monotonic() + timeout
        before = len(self.raw)
        last_change = None
        while time.monotonic() < deadline:
            size = len(self.raw)
            try:
                self._read(0.1)
            except pexpect.EOF:
                return
            if len(self.raw) != size:
                last_change = time.monotonic()
            elif last_change is not None and time.monotonic() - last_change >= quiet:
                return
        if len(self.raw) == before:
            raise AssertionError(f"no new output; the terminal shows:\n{self.text[-2000:]}")

    def send(self, text: str) -> None:
        self.child.send(text)

    def wait(self, timeout: float = 30) -> int:
        """Wait for the command to end; returns its exit status."""
        deadline = time.monotonic() + timeout
        while self.child.isalive():
            if time.monotonic() > deadline:
                raise AssertionError(f"still running; the terminal shows:\n{self.text[-2000:]}")
            try:
                self._read(0.2)
            except pexpect.EOF:
                break
        self.child.close()
        return self.child.exitstatus if self.child.exitstatus is not None else -1

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.child.close()


#: A file whose run prints one line and then spins until interrupted.
SPIN = "print('spinning', flush=True)\nwhile True: pass\n"


def interrupt_a_spinning_run(env: dict[str, str], path: Path, kernel: str, **options) -> None:
    """Run C{path} (L{SPIN}) on the kernel named C{kernel} in a terminal and
    press Ctrl-C once it spins: the command says so and exits 130."""
    terminal = Terminal(env, "run", str(path), "--kernel", kernel, **options)
    try:
        terminal.expect("spinning")
        terminal.send("\x03")
        terminal.expect("interrupted the kernel", timeout=30)
        assert terminal.wait() == 130
    finally:
        terminal.close()


def delete_named_kernels(server, state_dir: Path) -> None:
    """Shut down the kernels the commands created under names in C{state_dir}."""
    try:
        data = json.loads((state_dir / "cellmux" / "kernels.json").read_text())
    except (OSError, ValueError):
        return
    with server.client() as client:
        for names in data.values():
            for kernel_id in names.values():
                with contextlib.suppress(Exception):
                    client.delete_kernel(kernel_id)


def wait_until_idle(server, state_dir: Path, name: str, timeout: float = 30) -> None:
    """Wait until the kernel named C{name} went idle: after ``cellmux run``
    left on Ctrl-C, the interrupt may not have reached the kernel yet, and a
    request sent before it does is aborted with the interrupted one (the
    kernel's stop_on_error), which is not what a test of the next run means."""
    data = json.loads((state_dir / "cellmux" / "kernels.json").read_text())
    kernel_id = next(names[name] for names in data.values() if name in names)
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while client.get_kernel(kernel_id).execution_state != "idle":
            if time.monotonic() > deadline:
                raise AssertionError(f"kernel {name} not idle within {timeout} s")
            time.sleep(0.1)
