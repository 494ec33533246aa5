"""The system call filter every kernel runs under (docs/security.md, "Syscall filter").

A denylist in the spirit of Docker's default profile: everything is allowed
except the calls in L{RULES}, which fail with EPERM (so Python code gets a
clean C{PermissionError} instead of a dead process). The filter is compiled
once with libseccomp (through C{pyseccomp}) into a classic BPF program, and
each kernel child installs those bytes with one C{prctl}, after everything in
L{cellmux.kernel.sandbox.enter} that needed the denied calls (mounts,
namespaces, keyrings). Seccomp filters are inherited by every process the
kernel starts and can never be removed.

Nothing here touches Twisted.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

import attrs

__all__ = ["RULES", "Rule", "install", "program", "rules_for", "syscall_number"]

# Namespace flags of clone(2) and unshare(2) (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
)

# personality(2) flags that weaken memory protections (linux/personality.h).
ADDR_NO_RANDOMIZE = 0x0040000
MMAP_PAGE_ZERO = 0x0100000
ADDR_COMPAT_LAYOUT = 0x0200000
READ_IMPLIES_EXEC = 0x0400000
ADDR_LIMIT_32BIT = 0x0800000
ADDR_LIMIT_3GB = 0x8000000
PERSONALITY_FLAGS = (
    ADDR_NO_RANDOMIZE,
    MMAP_PAGE_ZERO,
    ADDR_COMPAT_LAYOUT,
    READ_IMPLIES_EXEC,
    ADDR_LIMIT_32BIT,
    ADDR_LIMIT_3GB,
)
#: personality(0xffffffff) only asks for the current persona; it has every bit
#: set, so each flag rule also requires this bit clear (no real persona has it).
_PERSONALITY_QUERY_BIT = 0x80000000

S_IFMT = 0o170000


@attrs.frozen
class Rule:
    """One denied system call, or one denied use of it.

    With C{arg} set, the call is denied only when C{args[arg] & mask ==
    value}; several rules for one call deny it when any of them matches.
    """

    syscall: str
    why: str
    errno: int = errno.EPERM
    arg: int | None = None
    mask: int = 0
    value: int = 0


def _each(names: str, why: str) -> list[Rule]:
    return [Rule(name, why) for name in names.split()]


#: The filter, in the order docs/security.md lists it.
RULES: tuple[Rule, ...] = (
    # Namespaces: a user namespace makes the kernel root inside it, which
    # opens much of the kernel's attack surface (mounts, netfilter, ...).
    *_each("unshare setns", "new or other namespaces"),
    *(
        Rule("clone", "new namespaces for a child", arg=0, mask=flag, value=flag)
        for flag in NAMESPACE_FLAGS
    ),
    # clone3 takes its flags in memory, which a filter cannot read: ENOSYS
    # makes glibc (threads, fork, posix_spawn) fall back to clone, where they can.
    Rule("clone3", "flags out of the filter's sight; glibc falls back to clone", errno.ENOSYS),
    # Kernel interfaces with a long record of privilege escalations.
    *_each("io_uring_setup io_uring_enter io_uring_register", "io_uring"),
    *_each("bpf perf_event_open userfaultfd", "kernel attack surface"),
    # Keyrings outlive the process: the next kernel with the same uid would
    # find what this one left in its user keyring.
    *_each("keyctl add_key request_key", "keyrings shared by every process of the uid"),
    # Mounts and file system views (a FUSE mount needs mount too).
    *_each(
        "mount umount2 pivot_root chroot move_mount open_tree fsopen fsconfig fsmount "
        "fspick mount_setattr",
        "mounts",
    ),
    *_each("open_by_handle_at", "opening files by handle, around directory permissions"),
    # Other processes' memory (pdb and ipykernel's debugger use sys.settrace,
    # not ptrace; only attaching a debugger to another pid needs it).
    *_each("ptrace process_vm_readv process_vm_writev pidfd_getfd kcmp", "other processes"),
    # The machine itself: each needs a capability a kernel should never have.
    *_each(
        "kexec_load kexec_file_load reboot init_module finit_module delete_module "
        "swapon swapoff acct syslog quotactl settimeofday clock_settime iopl ioperm",
        "the machine",
    ),
    *(
        Rule(
            "personality",
            "personas that weaken address randomisation or non-executable memory",
            arg=0,
            mask=flag | _PERSONALITY_QUERY_BIT,
            value=flag,
        )
        for flag in PERSONALITY_FLAGS
    ),
    # Device nodes (FIFOs and sockets stay allowed).
    *(
        Rule(name, "device nodes", arg=arg, mask=S_IFMT, value=kind)
        for name, arg in (("mknod", 1), ("mknodat", 2))
        for kind in (0o020000, 0o060000)  # S_IFCHR, S_IFBLK
    ),
)


def rules_for(syscall: str) -> list[Rule]:
    return [rule for rule in RULES if rule.syscall == syscall]


@functools.cache
def syscall_number(name: str) -> int | None:
    """The number of a system call on this machine's native ABI, if it has it."""
    import pyseccomp

    number = pyseccomp.resolve_syscall(pyseccomp.system_arch(), name)
    return number if number >= 0 else None


@functools.cache
def program() -> bytes:
    """The filter as classic BPF for this machine's native ABI.

    Compiled once per process (the nursery calls it before it forks, so a
    kernel only copies the bytes in). System calls of another ABI (i386's
    int 0x80, x32) end the process: these rules are written for the native
    numbers and would not apply to them. Calls this libseccomp does not know
    on this architecture are left out.
    """
    import pyseccomp

    flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    flt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    for rule in RULES:
        if syscall_number(rule.syscall) is None:
            continue
        args = []
        if rule.arg is not None:
            args.append(pyseccomp.Arg(rule.arg, pyseccomp.MASKED_EQ, rule.mask, rule.value))
        flt.add_rule(pyseccomp.ERRNO(rule.errno), rule.syscall, *args)
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(write_end, "wb", closefd=True) as sink:
            flt.export_bpf(sink)
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_end)
    return b"".join(chunks)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_BPF_INSTRUCTION_SIZE = 8

_libc = ctypes.CDLL(None, use_errno=True)


def install(bpf: bytes) -> None:
    """Put the calling thread (and everything it starts) under the filter.

    Call it in a single-threaded process: other threads would stay unfiltered.

    @raise OSError: if the kernel refuses the filter.
    """
    buffer = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // _BPF_INSTRUCTION_SIZE, ctypes.addressof(buffer))
    # No new privileges: required for a filter without CAP_SYS_ADMIN, wanted anyway.
    _prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0))
    _prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(prog))


def _prctl(option: int, arg2: object, arg3: object) -> None:
    if _libc.prctl(option, arg2, arg3, ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"installing the syscall filter: {os.strerror(err)}")
