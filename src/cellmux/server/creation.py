# -*- test-case-name: tests.test_named_tokens -*-
"""Creating a kernel for a credential: a named token's quota and ownership,
then the kernel's start-up run (environment, code, a visitor's limits).

``POST /api/kernels``, Jupyter sessions and ``/embed/kernels`` all create
through L{KernelCreator}, so a quota cannot be dodged by another door.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from .attachment import Forbidden
from .auth import Grant, TokenAuth
from .kernels import Kernel, KernelError, KernelManager
from .startup import StartupFailed, limits_code, prepare_kernel, startup_code

__all__ = [
    "KernelCreator",
    "OverQuota",
    "StartupRefused",
    "StartupUnsupported",
    "forget_ended_kernels",
]


class OverQuota(KernelError):
    """A named token has as many kernels as its max_kernels allows."""

    code = "over_quota"
    status = HTTPStatus.TOO_MANY_REQUESTS


class StartupRefused(KernelError):
    """The create request's own start-up code failed: the kernel is deleted."""

    code = "startup_failed"
    status = HTTPStatus.BAD_REQUEST


class StartupUnsupported(KernelError):
    """Start-up code (env, kernel_startup, public limits) asked for a kernel
    of another kernelspec: that code is Python, only python3 runs it."""

    code = "startup_unsupported"
    status = HTTPStatus.BAD_REQUEST


class StartupBroken(KernelError):
    """The config's start-up (kernel_startup, env) failed: the kernel is deleted."""

    code = "startup_failed"
    status = HTTPStatus.INTERNAL_SERVER_ERROR


def forget_ended_kernels(manager: KernelManager, auth: TokenAuth) -> Callable[[], None]:
    """Drop the shares, capabilities and logins of every kernel that ends
    while this server runs (shut down by a client, culled, deleted), from
    memory and the database. Kernels of an earlier server are not this
    server's to judge: their shares stay until revoked (security.md).

    @return: the manager's change listener: remove it before the server
        stops, or stopping (which ends every kernel) forgets every share.
    """
    known: set[str] = set(manager.kernels)

    def changed() -> None:
        nonlocal known
        current = set(manager.kernels)
        for kernel_id in known - current:
            auth.forget_kernel(kernel_id)
        known = current

    manager.change_listeners.append(changed)
    return changed


class KernelCreator:
    """Creates kernels on behalf of grants."""

    log = Logger()

    def __init__(self, manager: KernelManager, auth: TokenAuth) -> None:
        self.manager = manager
        self.auth = auth
        # user -> creations under way (they count against the quota too)
        self._pending: Counter[str] = Counter()
        # kernel id -> (its start-up run, the process that had it): a
        # restart's new process gets it again. One entry per live kernel.
        self._prepared: dict[str, tuple[str, Any]] = {}
        manager.change_listeners.append(self._after_restarts)

    def _after_restarts(self) -> None:
        """Give each restarted kernel's new process its start-up run again.

        Called in the turn the new process is bound, before the restart's
        reply goes out: the run is ahead of every client's next request.
        """
        for kernel_id, (code, process) in list(self._prepared.items()):
            kernel = self.manager.kernels.get(kernel_id)
            if kernel is None:
                del self._prepared[kernel_id]
                continue
            if kernel.incarnation is None or kernel.incarnation is process:
                continue
            self._prepared[kernel_id] = (code, kernel.incarnation)
            d = defer.ensureDeferred(
                prepare_kernel(kernel, code, self.manager.clock, self.manager.config.max_frame_size)
            )
            d.addErrback(self._startup_after_restart_failed, kernel_id)

    def _startup_after_restart_failed(self, failure: Failure, kernel_id: str) -> None:
        self.log.warn(
            "kernel {id}: start-up after a restart failed: {error}",
            id=kernel_id,
            error=failure.value,
        )

    def user_kernels(self, user: str) -> list[str]:
        return self.auth.user_kernels(user, lambda k: k in self.manager.kernels)

    def _check_quota(self, user: str) -> None:
        named = self.auth.user(user)
        if named is None:
            raise Forbidden(f"no token named {user}")
        have = len(self.user_kernels(user)) + self._pending[user]
        if have >= named.max_kernels:
            raise OverQuota(
                f"the token {user} has {have} kernels, the most it may have "
                f"(max_kernels = {named.max_kernels}); shut one down first"
            )

    async def create(
        self,
        grant: Grant,
        name: str = "python3",
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        startup: str = "",
        public_limits: bool = False,
        host_label: str | None = None,
    ) -> Kernel:
        """A new kernel for C{grant}, prepared and ready for its first cell.

        @param env: variables to set (already checked against the allow-list).
        @param startup: the request's own start-up code (already allowed).
        @param public_limits: lower its limits to the public_limit_* settings.
        @param host_label: run it on a kernel host with this label.
        @raise KernelError: L{OverQuota} (429) over a named token's quota;
            L{StartupRefused} (400) when the request's start-up code fails,
            L{StartupBroken} (500) when the config's does; the manager's.
        """
        config = self.manager.config
        limits = ""
        if public_limits:
            limits = limits_code(
                {
                    "cpu_seconds": config.public_limit_cpu_seconds,
                    "memory_mb": config.public_limit_memory_mb,
                    "file_size_mb": config.public_limit_file_size_mb,
                    "open_files": config.public_limit_open_files,
                    # RLIMIT_NPROC counts every process of the uid: only
                    # with a uid per kernel (root) is it the kernel's own.
                    "processes": config.public_limit_processes if os.geteuid() == 0 else 0,
                }
            )
        code = startup_code(env or {}, config.kernel_startup, startup, limits)
        spec = self.manager.specs.get(name)
        if code and spec is not None and not spec.forked:
            # Refused rather than started without: limits and policy would
            # silently not apply.
            raise StartupUnsupported(
                f"kernel spec {name!r} cannot run start-up code (env, kernel_startup, "
                "public limits): only python3 kernels can"
            )
        user = grant.user
        if user is not None:
            self._check_quota(user)
            self._pending[user] += 1
        try:
            kernel = await self.manager.create(name, cwd=cwd, host_label=host_label)
        finally:
            if user is not None:
                self._pending[user] -= 1
                if not self._pending[user]:
                    del self._pending[user]
        if user is not None:
            self.auth.kernel_owners[kernel.id] = user
        if code:
            try:
                await prepare_kernel(kernel, code, self.manager.clock, config.max_frame_size)
            except StartupFailed as e:
                self.auth.forget_kernel(kernel.id)
                if kernel.id in self.manager.kernels:
                    self.manager.delete(kernel, "start-up failed")
                self.log.warn("kernel {id}: start-up failed: {error}", id=kernel.id, error=e)
                if startup:
                    raise StartupRefused(f"the kernel's start-up code failed: {e}") from None
                raise StartupBroken(f"the server's kernel start-up failed: {e}") from None
            self._prepared[kernel.id] = (code, kernel.incarnation)
        return kernel

    def describe(self, kernel: Kernel) -> dict[str, Any]:
        """The kernel's model, with its owner's name when a named token has it."""
        model = kernel.model()
        owner = self.auth.kernel_owners.get(kernel.id)
        if owner is not None:
            model["owner"] = owner
        return model
