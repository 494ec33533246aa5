# -*- test-case-name: tests.test_terminal_console -*-
"""``cellmux console``: a terminal REPL on a remote kernel.

Everything runs on one asyncio loop: prompt_toolkit's prompt and the
kernel's websocket. What the kernel decides, the kernel decides: Enter asks
its ``is_complete`` whether the input is finished (else a new line, indented
as it says), Tab asks its ``complete``. ``input()``, ``getpass`` and pdb
prompts are read with a second, history-less prompt.

Ctrl-C: while the prompt runs the terminal is in raw mode, so Ctrl-C is a
key that clears the input. While code runs the terminal is in its normal
mode, Ctrl-C raises SIGINT in this process, and the handler sends the
``interrupt`` control request: the kernel raises KeyboardInterrupt, its
traceback arrives as the execution's error, and the prompt comes back.
Ctrl-C at an ``input()`` prompt interrupts the kernel too.

Other clients (a browser) may use the same kernel at the same time; the
console shows the outputs of its own executions only (``cellmux attach
--watch`` shows everyone's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path
from typing import Any

from cellmux.client import AsyncKernel, CellmuxError, KernelDied

from .render import PROMPT_GRACE, Renderer
from .server import (
    EXIT_SERVER,
    EXIT_USAGE,
    KernelNames,
    ServerOptions,
    WrongSpec,
    add_server_arguments,
    add_spec_argument,
    fail,
    open_kernel,
    state_dir,
)

__all__ = ["Interrupted", "add_arguments", "add_console_options", "main", "run_console"]

#: Seconds to wait for is_complete and complete replies before giving up.
#: A kernel answers them while a cell runs, and the server answers
#: "unresponsive" within 2 s for one whose GIL C code holds; this only
#: covers a lost connection (Enter then runs the input as it is).
INTROSPECTION_TIMEOUT = 3.0


class Interrupted(Exception):
    """Ctrl-C or Ctrl-D at an input() prompt: the execution is abandoned."""


def add_console_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--save-dir",
        type=Path,
        metavar="DIR",
        help="where images and PDFs the code displays are saved (default: a private temp dir)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernel",
        metavar="NAME",
        help="a kernel id, or a name kept between runs (default: 'default')",
    )
    add_spec_argument(parser)
    add_console_options(parser)
    add_server_arguments(parser)


def _completer(kernel: AsyncKernel) -> Any:
    from prompt_toolkit.completion import Completer, Completion

    class KernelCompleter(Completer):
        """Completions from the kernel's complete_request."""

        def get_completions(self, document: Any, complete_event: Any) -> Iterable[Completion]:
            return ()  # only the async path is used (the app runs on asyncio)

        async def get_completions_async(
            self, document: Any, complete_event: Any
        ) -> AsyncGenerator[Completion, None]:
            cursor = document.cursor_position
            try:
                reply = await kernel.complete(document.text, cursor, timeout=INTROSPECTION_TIMEOUT)
            except (CellmuxError, TimeoutError):
                return
            start = reply.get("cursor_start", cursor)
            if not isinstance(start, int) or not 0 <= start <= cursor:
                return
            for match in reply.get("matches") or ():
                if isinstance(match, str):
                    yield Completion(match, start_position=start - cursor)

    return KernelCompleter()


def _key_bindings(kernel: AsyncKernel) -> Any:
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()
    # Enter may wait for the kernel's is_complete answer. Keys typed while
    # it does (a slow link, typing ahead) go after that Enter's newline, and
    # the next Enter starts from the buffer the previous one left.
    one_enter_at_a_time = asyncio.Lock()

    @bindings.add("enter")
    async def enter(event: Any) -> None:
        async with one_enter_at_a_time:
            if not event.app.is_done:  # an earlier Enter may have run the input
                await _enter(event)

    async def _enter(event: Any) -> None:
        buffer = event.current_buffer
        if buffer.complete_state is not None and buffer.complete_state.current_completion:
            buffer.apply_completion(buffer.complete_state.current_completion)
            return
        text = buffer.document.text
        if not buffer.document.is_cursor_at_the_end:
            buffer.insert_text("\n")
            return
        status, indent = "complete", ""
        if text.strip():
            try:
                reply = await kernel.is_complete(text, timeout=INTROSPECTION_TIMEOUT)
                status, indent = str(reply.get("status")), str(reply.get("indent", ""))
            except (CellmuxError, TimeoutError):
                pass  # run it as it is: the kernel will say what is wrong
        typed_meanwhile = buffer.text[len(text) :] if buffer.text.startswith(text) else None
        if status == "incomplete" and typed_meanwhile:
            buffer.text = text + "\n" + indent + typed_meanwhile
            buffer.cursor_position = len(buffer.text)
        elif status == "incomplete":
            buffer.insert_text("\n" + indent)
        else:
            buffer.text = text.rstrip()
            buffer.validate_and_handle()
        event.app.invalidate()

    @bindings.add("escape", "enter")
    def newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    return bindings


class Console:
    """The read-eval-print loop over one attached kernel."""

    def __init__(self, kernel: AsyncKernel, renderer: Renderer) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        self.kernel = kernel
        self.renderer = renderer
        self.count: int | None = None
        history_path = state_dir() / "console_history"
        try:
            history_path.parent.mkdir(parents=True, exist_ok=True)
            history: Any = FileHistory(str(history_path))
        except OSError:
            history = InMemoryHistory()
        self.session: Any = PromptSession(
            multiline=True,
            key_bindings=_key_bindings(kernel),
            completer=_completer(kernel),
            complete_while_typing=False,
            history=history,
            prompt_continuation=lambda width, line, wrap: "...: ".rjust(width),
        )
        self.input_session: Any = PromptSession()

    def prompt(self) -> str:
        return f"In [{self.count if self.count is not None else ' '}]: "

    async def ask(self, prompt: str, password: bool) -> str:
        """Answer the kernel's input_request from the terminal."""
        from prompt_toolkit.formatted_text import ANSI

        await asyncio.sleep(PROMPT_GRACE)
        try:
            # pdb's prompt may come coloured.
            return await self.input_session.prompt_async(
                ANSI(prompt), is_password=password, handle_sigint=False
            )
        except (KeyboardInterrupt, EOFError):
            raise Interrupted() from None

    def interrupt(self) -> None:
        """SIGINT while code runs: interrupt the kernel."""
        self.renderer.line("^C (interrupting the kernel)", sys.stderr)
        task = asyncio.ensure_future(self.kernel.interrupt(timeout=10))
        task.add_done_callback(self._interrupt_done)

    def _interrupt_done(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.renderer.line(f"cellmux: interrupt failed: {task.exception()}", sys.stderr)

    async def execute(self, code: str) -> None:
        try:
            result = await self.kernel.execute(
                code, on_output=self.renderer.output, on_stdin=self.ask
            )
        except Interrupted:
            self.renderer.line("KeyboardInterrupt (the kernel was interrupted)", sys.stderr)
            # The abandoned request still took an execution count: ask the
            # kernel (after the interrupted code) rather than guess.
            await self.sync_count()
            return
        except KernelDied as e:
            self.renderer.line(f"cellmux: {e}", sys.stderr)
            return
        finally:
            self.renderer.end_line()
        if result.execution_count is not None:
            self.count = result.execution_count + 1

    async def sync_count(self) -> None:
        """Number the next prompt as the kernel will number its input."""
        # A silent execution runs nothing and does not count, and its reply
        # carries the count; it waits behind the kernel's current request.
        # Right after an interrupted one the kernel aborts what was queued
        # behind it: ask again.
        with contextlib.suppress(TimeoutError):  # busy with another client's code
            for _ in range(5):
                reply = await self.kernel.execute("", silent=True, timeout=10)
                if reply.execution_count is not None:
                    self.count = reply.execution_count + 1
                    return
                await asyncio.sleep(0.1)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # The prompt gets Ctrl-C as a key (raw mode, handle_sigint=False), so
        # this handler only fires while code runs.
        loop.add_signal_handler(signal.SIGINT, self.interrupt)
        try:
            await self.sync_count()
            while not self.kernel.closed:
                try:
                    code = await self.session.prompt_async(self.prompt(), handle_sigint=False)
                except KeyboardInterrupt:
                    continue
                except EOFError:
                    break
                if code.strip():
                    await self.execute(code)
        finally:
            loop.remove_signal_handler(signal.SIGINT)


async def _console(options: ServerOptions, kernel_id: str, renderer: Renderer) -> None:
    client = options.async_client()
    async with client.connect(kernel_id) as kernel:
        renderer.line(
            f"cellmux console on kernel {kernel_id} at {options.url}\n"
            "Enter runs complete input, Esc Enter adds a line, Tab completes, "
            "Ctrl-C interrupts, Ctrl-D leaves.",
            sys.stderr,
        )
        await Console(kernel, renderer).run()


def run_console(options: ServerOptions, kernel_id: str, save_dir: Path | None) -> int:
    """Run the console on an existing kernel until Ctrl-D; returns the exit status."""
    renderer = Renderer(sys.stdout, sys.stderr, save_dir=save_dir)
    try:
        asyncio.run(_console(options, kernel_id, renderer))
    except CellmuxError as e:
        return fail(str(e), EXIT_SERVER)
    return 0


def main(args: argparse.Namespace) -> int:
    options = ServerOptions.from_args(args)
    try:
        with options.client() as client:
            model = open_kernel(client, KernelNames(options.url), args.kernel, args.spec)
    except WrongSpec as e:
        return fail(str(e), EXIT_USAGE)
    except CellmuxError as e:
        return fail(str(e), EXIT_SERVER)
    return run_console(options, model.id, args.save_dir)
