"""Pool kernels still starting never make a create fail at max_kernels:
the create waits for one of them (a fake nursery on a Clock)."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from cellmux.server.kernels import TooManyKernels
from test_lifecycle_units import Harness


def at_the_limit_with_one_starting() -> tuple[Harness, object]:
    """max_kernels 2: a client holds one, the pool's replacement is starting."""
    h = Harness(pool_size=1, max_kernels=2)
    h.clock.advance(1)
    h.make_ready()
    assert h.manager.pooled == 1
    first = h.create()  # from the pool
    h.clock.advance(1)  # its replacement is forked
    assert (h.manager.pooled, h.manager.warming) == (0, 1)
    return h, first


def test_a_create_waits_for_the_starting_pool_kernel_instead_of_refusing():
    h, first = at_the_limit_with_one_starting()
    pending = defer.ensureDeferred(h.manager.create())
    assert not pending.called  # was: TooManyKernels at once
    h.make_ready()
    second = h.successResult(pending)
    assert second.id != first.id
    # Nothing starting any more: a third is refused, at once.
    with pytest.raises(TooManyKernels):
        h.successResult(defer.ensureDeferred(h.manager.create()))


def test_only_as_many_creates_wait_as_kernels_are_starting():
    h, _first = at_the_limit_with_one_starting()
    waiting = defer.ensureDeferred(h.manager.create())
    with pytest.raises(TooManyKernels):
        h.successResult(defer.ensureDeferred(h.manager.create()))
    assert not waiting.called


def test_a_waiting_create_is_refused_when_the_starting_kernel_fails():
    h, _first = at_the_limit_with_one_starting()
    waiting = defer.ensureDeferred(h.manager.create())
    (starting,) = [d for d in h.nursery.spawned.values() if not d.called]
    starting.errback(RuntimeError("fork failed"))
    with pytest.raises(TooManyKernels):
        h.successResult(waiting)
