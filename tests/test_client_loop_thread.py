"""The blocking client's loop thread: usable as soon as it is made."""

from __future__ import annotations

import asyncio
import time

from cellmux.client._sync import _LoopThread


class SlowToStart(_LoopThread):
    """A loop thread the scheduler runs late, as on a loaded machine."""

    def _main(self, *args: object) -> None:
        time.sleep(0.3)
        super()._main(*args)  # type: ignore[arg-type]


async def answer() -> int:
    await asyncio.sleep(0)
    return 42


def test_a_call_right_after_the_start_waits_for_the_loop() -> None:
    # cellmux run's first call came before the thread ran its loop: "the
    # client is closed", and the loop closed under the thread (a flaky
    # terminal test under load).
    loop = SlowToStart()
    try:
        assert loop.run(answer()) == 42
    finally:
        loop.stop()
    assert loop.loop.is_closed() and not loop.thread.is_alive()


def test_a_loop_thread_that_dies_at_start_does_not_hang_its_maker() -> None:
    class Dies(_LoopThread):
        def _main(self, *args: object) -> None:
            return  # the thread ends before its loop runs

    started = time.monotonic()
    dead = Dies()
    assert time.monotonic() - started < 5 and not dead.thread.is_alive()
    dead.stop()
    assert dead.loop.is_closed()
