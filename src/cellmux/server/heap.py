"""Keep the server's start-up objects out of the garbage collector's passes.

A full collection (CPython's oldest generation) walks every tracked object,
and the server's are mostly the modules, classes and functions it imported
and the site it built at start-up: 78,000 objects with its warm pool
(measured), 15 ms or more of a loaded core per full pass, paid as a pause
of the reactor (every client and kernel waits) every few seconds while
cells run. Those objects live as long as the process: L{settle} moves them
out of every later pass (C{gc.freeze}), so a pass walks only what came
since: 200 objects, and about 50 more per kernel.

What kernels add is kept small the same way: their replay logs hold plain
tuples, which the collector stops tracking (server/replay.py).

The price: a reference cycle among frozen objects that later becomes
garbage is never collected. Only start-up objects are frozen, once.
"""

from __future__ import annotations

import gc

__all__ = ["settle"]


def settle() -> int:
    """Collect what start-up left as garbage, then freeze the rest.

    @return: how many objects are now out of the collector's passes.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
