"""input(), getpass and pdb answered over the wire."""

from __future__ import annotations


def test_input_prompt_reaches_client_and_answer_reaches_kernel(kernel):
    prompts = []

    def answer(prompt: str, password: bool) -> str:
        prompts.append((prompt, password))
        return "bob"

    result = kernel.execute("name = input('name? ')\nprint('hello', name)", on_stdin=answer)
    assert prompts == [("name? ", False)]
    assert result.stdout == "hello bob\n"


def test_getpass_is_flagged_as_password(kernel):
    prompts = []

    def answer(prompt: str, password: bool) -> str:
        prompts.append((prompt, password))
        return "s3cret"

    result = kernel.execute(
        "import getpass\npw = getpass.getpass('pw: ')\nprint(len(pw))", on_stdin=answer
    )
    assert prompts == [("pw: ", True)]
    assert result.stdout == "6\n"


def test_breakpoint_then_p_and_c(kernel):
    answers = iter(["p x", "c"])
    prompts = []

    def answer(prompt: str, password: bool) -> str:
        prompts.append(prompt)
        return next(answers)

    result = kernel.execute(
        "x = 42\nbreakpoint()\ny = x + 1\nprint('done', y)", on_stdin=answer, timeout=60
    )
    assert len(prompts) == 2
    assert all("db>" in p for p in prompts)  # "ipdb> " (IPython's pdb)
    assert "42" in result.stdout
    assert result.stdout.rstrip().endswith("done 43")
    assert result.ok


def test_input_request_goes_only_to_the_requesting_client(client, kernel):
    """A second client attached to the same kernel never sees the prompt."""
    seen_by_other = []
    with client.connect(kernel.kernel_id) as other:
        other.add_listener(lambda frame: seen_by_other.append(frame.channel))
        result = kernel.execute("print(input('q? '))", on_stdin=lambda p, pw: "answer")
        assert result.stdout == "answer\n"
        other.ping()  # everything the server sent before this has arrived
    assert 2 in seen_by_other  # it did see the output
    assert 1 not in seen_by_other  # but not the stdin channel
