# -*- test-case-name: tests.test_priority -*-
"""The server's share of the CPU against its kernels (``server_nice``).

Every kernel leads a session of its own, and Linux's autogroup scheduling
(on when the CPU controller of a cgroup does not apply: most machines
without systemd's CPU accounting, containers, VMs) gives each session an
equal share: with a hundred kernels running cells, the server's session
is one in a hundred and one. Its reactor then waits on the run queue for a
core, often for tens of milliseconds, while every client and kernel waits
for it (measured with ``CELLMUX_STALL_LOG``: of the time in iterations over
10 ms, 93 % was run-queue wait, 4 % the server's own work). The server is what every
round trip goes through, so it should get a core first.

L{raise_priority} gives the server's autogroup the nice value
C{server_nice}: only the server and its nursery are in it; kernels start
sessions (autogroups) of their own at nice 0, and nothing they inherit
changes that. It is done only when the server leads its own session (as
under systemd, or ``setsid cellmux serve``): started from a shell, the
session is the shell's and everything run from it, which is not the
server's to favour. A negative value needs CAP_SYS_NICE (root); without
it, or without autogroups, nothing changes and the log says why.
"""

from __future__ import annotations

import os

import attrs

__all__ = ["PriorityOutcome", "raise_priority"]

AUTOGROUP = "/proc/self/autogroup"


@attrs.frozen
class PriorityOutcome:
    """What L{raise_priority} did: C{applied}, or why not (C{reason})."""

    applied: bool
    reason: str


def raise_priority(
    nice: int,
    autogroup: str = AUTOGROUP,
    leads_session: bool | None = None,
) -> PriorityOutcome:
    """Set this process's autogroup's nice value to C{nice} if it may.

    @param autogroup: the autogroup file (tests give another).
    @param leads_session: whether this process leads its session (None:
        ask the system).
    """
    if nice == 0:
        return PriorityOutcome(False, "server_nice is 0")
    if leads_session is None:
        leads_session = os.getsid(0) == os.getpid()
    if not leads_session:
        return PriorityOutcome(
            False,
            "the server does not lead its session (its autogroup is shared with "
            "whatever started it); start it with setsid, or under systemd",
        )
    try:
        with open(autogroup, "w") as f:
            f.write(str(nice))
    except FileNotFoundError:
        return PriorityOutcome(False, "no autogroup scheduling on this system")
    except PermissionError:
        return PriorityOutcome(False, "not permitted (a negative value needs CAP_SYS_NICE)")
    except OSError as e:
        return PriorityOutcome(False, f"could not set it: {e.strerror or e}")
    return PriorityOutcome(True, f"the server's autogroup runs at nice {nice}")
