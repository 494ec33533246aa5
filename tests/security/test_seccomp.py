"""The kernels' syscall filter (cellmux.kernel.seccomp), call by call.

Each denied call is tried twice: in a forked root process of the test, before
and after installing the filter (the arguments are chosen so that, without
the filter, root gets another answer than the filter's: EINVAL, EFAULT, a
success that changes nothing), and in a real kernel of a real server run as
root. Normal work (threads, subprocesses, multiprocessing, sockets on
loopback, numpy, matplotlib) still runs under the filter.

Needs root (the server's kernels get their own uids and namespaces; the
keyring test switches to a kernel uid). The machine runs as root here and in CI.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from cellmux.kernel import seccomp
from conftest import start_server

CLONE_SIGHAND = 0x800  # without CLONE_VM: EINVAL before anything else
AT_FDCWD = -100
NOWHERE = b"/nonexistent-cellmux-dir/node"

#: probe id -> (syscall, arguments, errno name the filter gives)
PROBES: dict[str, tuple[str, tuple, str]] = {
    "unshare": ("unshare", (0,), "EPERM"),
    "setns": ("setns", (-1, 0), "EPERM"),
    **{
        f"clone-{name}": ("clone", (flag | CLONE_SIGHAND, 0, 0, 0, 0), "EPERM")
        for name, flag in [
            ("newns", seccomp.CLONE_NEWNS),
            ("newcgroup", seccomp.CLONE_NEWCGROUP),
            ("newuts", seccomp.CLONE_NEWUTS),
            ("newipc", seccomp.CLONE_NEWIPC),
            ("newuser", seccomp.CLONE_NEWUSER),
            ("newpid", seccomp.CLONE_NEWPID),
            ("newnet", seccomp.CLONE_NEWNET),
        ]
    },
    "clone3": ("clone3", (0, 0), "ENOSYS"),
    "io_uring_setup": ("io_uring_setup", (0, 0), "EPERM"),
    "io_uring_enter": ("io_uring_enter", (-1, 0, 0, 0, 0, 0), "EPERM"),
    "io_uring_register": ("io_uring_register", (-1, 0, 0, 0), "EPERM"),
    "bpf": ("bpf", (-1, 0, 0), "EPERM"),
    "perf_event_open": ("perf_event_open", (0, 0, -1, -1, 0), "EPERM"),
    "userfaultfd": ("userfaultfd", (-1,), "EPERM"),
    "keyctl": ("keyctl", (-1,), "EPERM"),
    "add_key": ("add_key", (0, 0, 0, 0, 0), "EPERM"),
    "request_key": ("request_key", (0, 0, 0, 0), "EPERM"),
    "mount": ("mount", (0, 0, 0, 0, 0), "EPERM"),
    "umount2": ("umount2", (0, 0), "EPERM"),
    "pivot_root": ("pivot_root", (0, 0), "EPERM"),
    "chroot": ("chroot", (0,), "EPERM"),
    "move_mount": ("move_mount", (-1, 0, -1, 0, 0x7FFFFFFF), "EPERM"),
    "open_tree": ("open_tree", (-1, 0, 0x7FFFFFFF), "EPERM"),
    "fsopen": ("fsopen", (0, 0x7FFFFFFF), "EPERM"),
    "fsconfig": ("fsconfig", (-1, 0xFF, 0, 0, 0), "EPERM"),
    "fsmount": ("fsmount", (-1, 0x7FFFFFFF, 0), "EPERM"),
    "fspick": ("fspick", (-1, 0, 0x7FFFFFFF), "EPERM"),
    "mount_setattr": ("mount_setattr", (-1, 0, 0x7FFFFFFF, 0, 0), "EPERM"),
    "open_by_handle_at": ("open_by_handle_at", (-1, 0, 0), "EPERM"),
    "ptrace": ("ptrace", (16, 0, 0, 0), "EPERM"),  # PTRACE_ATTACH to pid 0
    "process_vm_readv": ("process_vm_readv", ("self", 0, 0, 0, 0, 0), "EPERM"),
    "process_vm_writev": ("process_vm_writev", ("self", 0, 0, 0, 0, 0), "EPERM"),
    "pidfd_getfd": ("pidfd_getfd", (-1, 0, 0), "EPERM"),
    "kcmp": ("kcmp", (0, 0, -1, 0, 0), "EPERM"),
    "kexec_load": ("kexec_load", (0, 0, 0, 0xFFFF0000), "EPERM"),
    "kexec_file_load": ("kexec_file_load", (-1, -1, 0, 0, 0xFFFF0000), "EPERM"),
    "reboot": ("reboot", (0, 0, 0, 0), "EPERM"),  # wrong magic
    "init_module": ("init_module", (0, 0, 0), "EPERM"),
    "finit_module": ("finit_module", (-1, 0, 0), "EPERM"),
    "delete_module": ("delete_module", (0, 0), "EPERM"),
    "swapon": ("swapon", (0, 0), "EPERM"),
    "swapoff": ("swapoff", (0,), "EPERM"),
    "acct": ("acct", (1,), "EPERM"),
    "syslog": ("syslog", (10, 0, 0), "EPERM"),  # SYSLOG_ACTION_SIZE_BUFFER
    "quotactl": ("quotactl", (0, 0, 0, 0), "EPERM"),
    "settimeofday": ("settimeofday", (0, 0), "EPERM"),  # both NULL: changes nothing
    "clock_settime": ("clock_settime", (-1, 0), "EPERM"),
    "iopl": ("iopl", (4,), "EPERM"),
    "ioperm": ("ioperm", (0, 0, 0), "EPERM"),
    **{
        f"personality-{hex(flag)}": ("personality", (flag,), "EPERM")
        for flag in seccomp.PERSONALITY_FLAGS
    },
    "mknod-char": ("mknod", (NOWHERE, 0o020600, 0), "EPERM"),
    "mknod-block": ("mknod", (NOWHERE, 0o060600, 0), "EPERM"),
    "mknodat-char": ("mknodat", (AT_FDCWD, NOWHERE, 0o020600, 0), "EPERM"),
    "mknodat-block": ("mknodat", (AT_FDCWD, NOWHERE, 0o060600, 0), "EPERM"),
}

#: Runs in the forked test process and in kernels: probe(syscall, args) is
#: "ok" or the errno's name.
PROBE_SOURCE = textwrap.dedent(
    """
    import ctypes as _ct, errno as _errno, os as _os
    import pyseccomp as _ps
    _libc = _ct.CDLL(None, use_errno=True)

    def probe(syscall, args):
        number = _ps.resolve_syscall(_ps.system_arch(), syscall)
        values = []
        for a in args:
            if a == "self":
                a = _os.getpid()
            values.append(_ct.c_char_p(a) if isinstance(a, bytes) else _ct.c_long(a))
        _ct.set_errno(0)
        if _libc.syscall(_ct.c_long(number), *values) == -1:
            return _errno.errorcode[_ct.get_errno()]
        return "ok"
    """
)


def _known(syscall: str) -> bool:
    import pyseccomp

    return pyseccomp.resolve_syscall(pyseccomp.system_arch(), syscall) >= 0


def _in_filtered_child(code: str) -> dict:
    """Run code in a forked child (root, as the test runs) that defines
    C{result}; returns it as JSON-decoded."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(reader)
            scope: dict = {}
            exec(PROBE_SOURCE + "\n" + code, scope)
            os.write(writer, json.dumps(scope["result"]).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(writer)
    chunks = []
    while chunk := os.read(reader, 65536):
        chunks.append(chunk)
    os.close(reader)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
    return json.loads(b"".join(chunks))


def test_every_rule_is_probed():
    probed = {syscall for syscall, _, _ in PROBES.values()}
    assert probed == {rule.syscall for rule in seccomp.RULES}


def test_each_probe_is_answered_by_the_filter_and_only_by_it():
    """Root without the filter gets another answer; with it, the filter's."""
    probes = {name: [syscall, list(args)] for name, (syscall, args, _) in PROBES.items()}
    outcome = _in_filtered_child(
        f"""
from cellmux.kernel import seccomp
probes = {probes!r}
before = {{name: probe(s, a) for name, (s, a) in probes.items()}}
seccomp.install(seccomp.program())
after = {{name: probe(s, a) for name, (s, a) in probes.items()}}
result = [before, after]
"""
    )
    before, after = outcome
    for name, (syscall, _, expected) in PROBES.items():
        if not _known(syscall):
            continue
        assert after[name] == expected, (name, after[name])
        assert before[name] != expected, (name, before[name])


def test_the_filter_lets_allowed_uses_through():
    outcome = _in_filtered_child(
        """
import os, tempfile, threading
from cellmux.kernel import seccomp
seccomp.install(seccomp.program())
result = {}
# the persona query, FIFOs, fork and a plain clone
result["personality query"] = probe("personality", (0xFFFFFFFF,))
result["personality linux32"] = probe("personality", (0x0008,))
with tempfile.TemporaryDirectory() as d:
    os.mkfifo(os.path.join(d, "fifo"))
    result["fifo"] = "ok"
pid = os.fork()
if pid == 0:
    os._exit(7)
result["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
t = threading.Thread(target=lambda: None)
t.start(); t.join()
result["thread"] = "ok"
"""
    )
    assert outcome == {
        "personality query": "ok",
        "personality linux32": "ok",
        "fifo": "ok",
        "fork": 7,
        "thread": "ok",
    }


def test_a_syscall_of_another_abi_ends_the_process(tmp_path):
    """i386's int 0x80 is not checked against these rules: the process ends."""
    if os.uname().machine != "x86_64":
        pytest.fail("this test is written for x86_64")
    code = textwrap.dedent(
        """
        import ctypes, mmap, resource, sys
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGSYS would dump core
        sys.path[:0] = PATHS
        from cellmux.kernel import seccomp
        seccomp.install(seccomp.program())
        # mov eax, 20 (getpid on i386); int 0x80; ret
        code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])
        page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        ctypes.CFUNCTYPE(ctypes.c_int)(address)()
        print("survived")
        """
    ).replace("PATHS", repr(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == -31, (done.returncode, done.stderr[-2000:])  # SIGSYS
    assert b"survived" not in done.stdout


# -- in real kernels -------------------------------------------------------


@pytest.fixture(scope="module")
def probing_kernel(server):
    with server.client() as c:
        model = c.create_kernel()
        try:
            with c.connect(model.id) as k:
                result = k.execute(PROBE_SOURCE, timeout=60)
                assert result.error is None, result.error
                yield k
        finally:
            with contextlib.suppress(Exception):
                c.delete_kernel(model.id)


def test_kernels_run_under_the_filter(probing_kernel):
    result = probing_kernel.execute(
        "print([l for l in open('/proc/self/status') if l.startswith(('Seccomp', 'NoNewPrivs'))])"
    )
    assert result.error is None, result.error
    assert "'Seccomp:\\t2\\n'" in result.stdout
    assert "'NoNewPrivs:\\t1\\n'" in result.stdout


@pytest.mark.parametrize("name", sorted(PROBES))
def test_a_kernel_is_denied(probing_kernel, name):
    syscall, args, expected = PROBES[name]
    if not _known(syscall):
        pytest.fail(f"{syscall} unknown to libseccomp here: update the probes")
    result = probing_kernel.execute(f"print(probe({syscall!r}, {args!r}))", timeout=30)
    assert result.error is None, result.error
    assert result.stdout.strip() == expected


def test_python_code_gets_a_clean_permission_error(probing_kernel):
    result = probing_kernel.execute(
        "import os\ntry:\n    os.chroot('/')\nexcept PermissionError as e:\n    print(e.errno)"
    )
    assert result.error is None, result.error
    assert result.stdout.strip() == str(errno.EPERM)


def test_normal_work_runs_under_the_filter(probing_kernel):
    code = textwrap.dedent(
        """
        import json, multiprocessing, socket, subprocess, sys, threading
        import numpy
        import matplotlib
        matplotlib.use("agg")
        import matplotlib.pyplot as plt
        done = {}
        threads = [threading.Thread(target=lambda i=i: done.setdefault(i, i)) for i in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        done["threads"] = len(threads)
        done["subprocess"] = subprocess.run(
            [sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True
        ).stdout.strip()
        with multiprocessing.get_context("fork").Pool(2) as pool:
            done["multiprocessing"] = pool.map(abs, [-1, -2, -3])
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        client.sendall(b"ping")
        done["socket"] = peer.recv(4).decode()
        for s in (client, peer, server): s.close()
        done["numpy"] = int(numpy.arange(10).sum())
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3])
        import io
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        done["png"] = buf.getvalue()[:4] == b"\\x89PNG"
        print(json.dumps({k: v for k, v in done.items() if isinstance(k, str)}))
        """
    )
    result = probing_kernel.execute(code, timeout=120)
    assert result.error is None, result.error
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "threads": 8,
        "subprocess": "42",
        "multiprocessing": [1, 2, 3],
        "socket": "ping",
        "numpy": 45,
        "png": True,
    }


def test_device_nodes_a_kernel_has_no_use_for_are_null(probing_kernel):
    present = [d for d in ("/dev/fuse", "/dev/kvm") if os.path.exists(d)]
    assert present, "this machine has neither /dev/fuse nor /dev/kvm: the test proves nothing"
    result = probing_kernel.execute(
        "import os\nnull = os.stat('/dev/null').st_rdev\n"
        f"print([os.stat(d).st_rdev == null for d in {present!r}])"
    )
    assert result.error is None, result.error
    assert result.stdout.strip() == str([True] * len(present))


# -- keyrings --------------------------------------------------------------

KEYRING_UID = 299977  # a range of one uid: every kernel of the server gets it
KEY_SPEC_USER_KEYRING = -4


def _as_uid(uid: int, code: str):
    """Run code as uid in a forked child of the test (not a kernel); its C{result}."""
    return _in_filtered_child(
        f"import os\nos.setgroups([])\nos.setresgid({uid}, {uid}, {uid})\n"
        f"os.setresuid({uid}, {uid}, {uid})\n" + code
    )


PLANT_KEY = f"""
number = _ps.resolve_syscall(_ps.system_arch(), "add_key")
key = _libc.syscall(
    _ct.c_long(number), _ct.c_char_p(b"user"), _ct.c_char_p(b"cellmux-test"),
    _ct.c_char_p(b"left behind"), _ct.c_long(11), _ct.c_long({KEY_SPEC_USER_KEYRING}),
)
result = key > 0 or _errno.errorcode[_ct.get_errno()]
"""
FIND_KEY = f"""
number = _ps.resolve_syscall(_ps.system_arch(), "keyctl")
# KEYCTL_SEARCH (10) in the user keyring
found = _libc.syscall(_ct.c_long(number), _ct.c_long(10), _ct.c_long({KEY_SPEC_USER_KEYRING}),
                      _ct.c_char_p(b"user"), _ct.c_char_p(b"cellmux-test"), _ct.c_long(0))
result = "found" if found > 0 else _errno.errorcode[_ct.get_errno()]
"""


def test_a_kernel_starts_on_an_empty_user_keyring(tmp_path):
    """What an earlier holder of the uid left in its user keyring is gone
    once a kernel gets that uid; the kernel itself cannot add a key."""
    assert _as_uid(KEYRING_UID, PLANT_KEY) is True
    # the key outlives the process that added it: this is the leak
    assert _as_uid(KEYRING_UID, FIND_KEY) == "found"
    config = tmp_path / "cellmux.toml"
    config.write_text(f"kernel_uid_range = [{KEYRING_UID}, {KEYRING_UID}]\n")
    running = start_server("--config", str(config), "--pool-size", "0")
    try:
        with running.client() as c:
            model = c.create_kernel()
            try:
                with c.connect(model.id) as k:
                    result = k.execute(
                        PROBE_SOURCE + FIND_KEY + "\nprint(_os.getuid(), result)", timeout=60
                    )
                    assert result.error is None, result.error
                    uid, found = result.stdout.split()
                    assert int(uid) == KEYRING_UID
                    assert found == "EPERM"  # keyctl is denied in kernels
                # the key left before the kernel started is no longer there
                assert _as_uid(KEYRING_UID, FIND_KEY) == "ENOKEY"
            finally:
                c.delete_kernel(model.id)
    finally:
        running.stop()
        shutil.rmtree(running.runtime_dir, ignore_errors=True)


# -- cost ------------------------------------------------------------------


def test_installing_the_compiled_filter_is_cheap():
    code = """
import time
from cellmux.kernel import seccomp
bpf = seccomp.program()
started = time.perf_counter()
seccomp.install(bpf)
result = time.perf_counter() - started
"""
    # The best of a few forks: other load on the machine only adds to it.
    best = min(_in_filtered_child(code) for _ in range(5))
    # about 0.2 ms measured; the bound leaves room for a slow machine
    assert best < 0.005, best
