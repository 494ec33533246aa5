"""``cellmux console`` driven through a real pseudo-terminal, on a real kernel."""

from __future__ import annotations

import re

import pytest

from terminal_helpers import Terminal, cellmux_env, delete_named_kernels

PROMPT = r"In \[(\d+)\]:"


@pytest.fixture
def console(server, tmp_path):
    """A console on a fresh kernel named 'c', at its first prompt."""
    state = tmp_path / "state"
    terminal = Terminal(cellmux_env(server, state), "console", "--kernel", "c")
    try:
        terminal.expect(PROMPT)
        yield terminal
    finally:
        terminal.close()
        delete_named_kernels(server, state)


def run(console: Terminal, line: str) -> None:
    console.send(line + "\r")


def type_block(console: Terminal, lines: list[str]) -> None:
    """Type a block line by line, waiting for the kernel's is_complete after each
    Enter: every line but the last gets a continuation prompt."""
    for line in lines[:-1]:
        run(console, line)
        console.expect(r"\.\.\.:")
    run(console, lines[-1])


def test_two_line_for_loop_is_one_input(console):
    # The kernel says incomplete after each line: a block ends with a blank line.
    type_block(console, ["for i in range(3):", "print(i * 10)", ""])
    console.expect(r"\n0\n10\n20\n")
    prompt = console.expect(PROMPT)
    assert prompt.group(1) == "2"  # one execution, not two


def test_tab_completes_from_the_kernel(console):
    run(console, "import os")
    console.expect(PROMPT)
    console.send("os.pa\t")
    console.expect("pathsep")  # several matches: the menu lists them
    console.send("\x03")  # Ctrl-C at the prompt drops the input
    console.expect(PROMPT)
    console.send("os.path.isab")
    console.settle()
    console.send("\t")  # one match: inserted
    console.settle()
    run(console, "('/x')")
    console.expect(r"Out\[\d+\]: True")


def test_input_and_getpass_are_answered(console):
    # The prompts are built so that the echo of the code does not contain them:
    # the answer must be typed at the prompt, not before (where it would echo).
    run(console, "name = input('who' + '? ')")
    console.expect(r"who\?")
    run(console, "Ada")
    console.expect(PROMPT)
    run(console, "import getpass; pw = getpass.getpass('pw' + '> ')")
    console.expect("pw>")
    run(console, "s3cret")
    console.expect(PROMPT)
    run(console, "print(name, len(pw))")
    console.expect("Ada 6")
    assert "s3cret" not in console.text  # not echoed
    # Ctrl-C at an input() prompt interrupts the kernel; the console goes on.
    run(console, "input('again' + '? ')")
    console.expect(r"again\?")
    console.send("\x03")
    console.expect("KeyboardInterrupt")
    console.expect(PROMPT)
    run(console, "name")
    console.expect(r"Out\[\d+\]: 'Ada'")


def test_ctrl_c_interrupts_the_kernel_and_the_console_stays_usable(console):
    run(console, "exec(\"print('spinning', flush=True)\\nwhile True: pass\")")
    console.expect(r"(?m)^spinning$")  # the output, not the echo of the input
    console.send("\x03")
    console.expect("KeyboardInterrupt")
    console.expect(PROMPT)
    run(console, "6 * 7")
    console.expect(r"Out\[\d+\]: 42")
    console.send("\x04")  # Ctrl-D leaves
    assert console.wait() == 0


def test_lines_typed_ahead_of_the_kernels_answer_keep_their_place(console):
    # All keys at once: each Enter's is_complete is still on its way while
    # the next line is typed (as on a slow link), and a second Enter comes
    # before the first one's answer. Each line still goes after its newline.
    console.send("def f():\rreturn 6 * 7\r\r")
    console.expect(PROMPT)
    run(console, "f()")
    console.expect(r"Out\[\d+\]: 42")


def test_pdb_in_the_console(console):
    # The console indents each new line as the kernel says.
    type_block(console, ["def f():", "x = 41", "breakpoint()", "x += 1", "return x", ""])
    console.expect(PROMPT)
    run(console, "f()")
    console.expect(r"---> 4\s+x \+= 1")
    console.expect("db>")
    run(console, "p x")
    console.expect("\n41\n")
    run(console, "n")
    console.expect("---> 5")
    run(console, "p x")
    console.expect("\n42\n")
    run(console, "c")
    console.expect(r"Out\[\d+\]: 42")


def test_images_are_saved_and_named(console, tmp_path):
    png = (  # a 1x1 PNG
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
    )
    run(console, "from IPython.display import Image, display")
    console.expect(PROMPT)
    run(console, f"import base64; display(Image(data=base64.b64decode('{png}')))")
    saved = console.expect(r"\[image/png saved to (\S+\.png)\]").group(1)
    with open(saved, "rb") as f:
        assert f.read().startswith(b"\x89PNG")
    assert re.search(r"<IPython.core.display.Image object>", console.text)


def test_attach_shares_a_kernel_with_another_client(server, client, kernel, tmp_path):
    """A console attached to a kernel a browser (here: the Python client) also uses."""
    kernel.execute("shared = 'from the browser'")
    terminal = Terminal(cellmux_env(server, tmp_path / "state"), "attach", kernel.kernel_id)
    try:
        terminal.expect(PROMPT)
        run(terminal, "print(shared); shared = 'from the console'")
        terminal.expect("from the browser")
        terminal.expect(PROMPT)
        assert kernel.execute("shared").result_text == "'from the console'"
        terminal.send("\x04")
        assert terminal.wait() == 0
    finally:
        terminal.close()
    assert client.get_kernel(kernel.kernel_id).execution_state == "idle"  # left running


def test_history_is_kept_between_consoles(console, server, tmp_path):
    run(console, "40 + 2")
    console.expect(r"Out\[\d+\]: 42")
    console.send("\x04")
    assert console.wait() == 0
    again = Terminal(cellmux_env(server, tmp_path / "state"), "console", "--kernel", "c")
    try:
        again.expect(PROMPT)
        again.send("\x1b[A")  # Up: the last input of the previous console
        again.settle()
        again.send("\r")
        again.expect(r"Out\[\d+\]: 42")
    finally:
        again.close()


def test_ctrl_c_at_input_keeps_the_prompt_number_and_prints_no_log_line(console):
    run(console, "'first'")
    count = int(console.expect(r"Out\[(\d+)\]: 'first'").group(1))
    run(console, "input('again' + '? ')")
    console.expect(r"again\?")
    console.send("\x03")
    console.expect("KeyboardInterrupt")
    # The interrupted input took count + 1 in the kernel: the next is count + 2.
    console.expect(rf"In \[{count + 2}\]:")
    run(console, "'next'")
    console.expect(rf"Out\[{count + 2}\]: 'next'")
    assert "stdin handler failed" not in console.text
    assert "Interrupted()" not in console.text
