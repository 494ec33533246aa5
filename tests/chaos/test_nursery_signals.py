"""A kill that lands while a kernel is being forked ends that kernel only.

Before the fix, the forked child kept the nursery's SIGTERM handler until
it reset its signals: a SIGTERM in that window ran the nursery's stop in
the child, which (still root, with a copy of the kernel table) killed every
other kernel.
"""

from __future__ import annotations

import random
import time

from cellmux.protocol import nursery as wire

from .nursery_driver import NurseryDriver, alive

TRIES = 80


def test_spawn_then_kill_at_once_never_touches_other_kernels(tmp_path):
    nursery = NurseryDriver(str(tmp_path))
    try:
        others = {}
        for _ in range(3):
            link = nursery.spawn()
            others[link] = nursery.expect(wire.Spawned, link=link).pid
        time.sleep(1)  # past their fork: what would be killed is running kernels
        rng = random.Random(13)
        victims = []
        for _ in range(TRIES):
            link = nursery.spawn()
            time.sleep(rng.uniform(0, 0.003))
            nursery.send(wire.Kill(link))
            victims.append(link)
        ended = set()
        while not set(victims) <= ended:
            event = nursery.next_event(timeout=60)
            if isinstance(event, wire.Exited):
                assert event.link not in others, f"another kernel died: {event}"
                ended.add(event.link)
        time.sleep(0.5)  # anything still on its way arrives
        while not nursery.events.empty():
            event = nursery.next_event()
            assert not (isinstance(event, wire.Exited) and event.link in others), event
        assert all(alive(pid) for pid in others.values())
        assert alive(nursery.pid)
    finally:
        nursery.stop()
    # and a stop ends them all
    assert {e.link for e in nursery.seen if isinstance(e, wire.Exited)} >= set(others)
