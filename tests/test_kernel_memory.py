"""What keeps each kernel's private memory small (cellmux.kernel.memory)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellmux.kernel import memory
from conftest import RunningServer, config_file, start_server, wait_for

KSM = "/sys/kernel/mm/ksm"


@pytest.fixture
def nursery_list(monkeypatch):
    """This process's modules listed as a nursery lists them before forking."""
    monkeypatch.setattr(memory, "_at_fork", None)
    monkeypatch.setattr(memory, "used_list_from_nursery", False)
    memory.record_module_files()
    return memory._at_fork


def _stock_listing(sys_module) -> list[str]:
    # The expression ipykernel's IPythonKernel.__init__ evaluates.
    return [
        m.__file__
        for m in sys_module.modules.copy().values()
        if hasattr(m, "__file__") and m.__file__
    ]


def test_the_listing_is_the_one_ipykernel_would_make(nursery_list):
    expected = _stock_listing(sys)
    user = types.ModuleType("user_code")
    user.sys = sys
    with memory.modules_listed_at_fork(user) as listed:
        assert listed
        assert _stock_listing(user.sys) == expected
        # The rest of sys is the real one.
        assert user.sys.path is sys.path
        assert user.sys.modules["os"] is sys.modules["os"]
        assert "os" in user.sys.modules and len(user.sys.modules) == len(sys.modules)
    assert user.sys is sys
    assert memory.used_list_from_nursery


def test_a_module_loaded_since_the_fork_means_ipykernel_lists_them_itself(
    nursery_list, monkeypatch
):
    monkeypatch.setitem(sys.modules, "loaded_after_the_fork", types.ModuleType("x"))
    user = types.ModuleType("user_code")
    user.sys = sys
    with memory.modules_listed_at_fork(user) as listed:
        assert not listed
        assert user.sys is sys
    assert not memory.used_list_from_nursery


def test_outside_a_nursery_nothing_changes(monkeypatch):
    monkeypatch.setattr(memory, "_at_fork", None)
    user = types.ModuleType("user_code")
    user.sys = sys
    with memory.modules_listed_at_fork(user) as listed:
        assert not listed and user.sys is sys


def test_kernels_get_the_module_list_from_the_nursery(kernel):
    # What stock ipykernel lists: the modules loaded when the kernel object
    # was built, the first n of sys.modules, with the __main__ of that time
    # (IPython has put the user's namespace there since).
    result = kernel.execute(
        "import sys, cellmux.kernel.memory as m\n"
        "ip = get_ipython()\n"
        "n = m._at_fork[0]\n"
        "then = dict(list(sys.modules.items())[:n], __main__=ip._orig_sys_modules_main_mod)\n"
        "at_start = [x.__file__ for x in then.values() if hasattr(x, '__file__') and x.__file__]\n"
        "k = ip.kernel\n"
        "print(m.used_list_from_nursery, k._kernel_modules == at_start,"
        " k.debugger.kernel_modules == at_start, len(at_start) > 100)\n"
        "print(ip.history_manager.hist_file, type(k).__name__)"
    )
    assert result.stdout.splitlines() == ["True True True True", ":memory: IPythonKernel"]


def test_warming_ipython_leaves_the_process_as_it_was(tmp_path):
    # In a fresh interpreter, as in the nursery: a shell is built, runs a
    # cell and is gone again, with nothing of it left behind.
    script = """
import atexit, builtins, os, sys, tempfile, weakref
from IPython.core.interactiveshell import InteractiveShell
from cellmux.kernel import memory
weakref.finalize(memory, int)  # its one atexit hook, registered once per process
live = []
register, unregister = atexit.register, atexit.unregister
atexit.register = lambda f, *a, **k: live.append(f) or register(f, *a, **k)
atexit.unregister = lambda f: [live.remove(g) for g in list(live) if g == f] and unregister(f)
before = (sys.displayhook, sys.excepthook, sys.stdout, sys.stderr, sys.modules["__main__"],
          dict(vars(builtins)), dict(os.environ), list(sys.path), list(live),
          sorted(os.listdir(tempfile.gettempdir())), sorted(os.listdir(".")))
memory.warm_ipython()
after = (sys.displayhook, sys.excepthook, sys.stdout, sys.stderr, sys.modules["__main__"],
         dict(vars(builtins)), dict(os.environ), list(sys.path), list(live),
         sorted(os.listdir(tempfile.gettempdir())), sorted(os.listdir(".")))
names = "displayhook excepthook stdout stderr main builtins environ path atexit tmp cwd"
for name, b, a in zip(names.split(), before, after):
    assert a == b, (name, b, a)
assert not InteractiveShell.initialized()
print("same")
"""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, HOME=".", TMPDIR=str(tmp))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.stdout.strip() == "same", done.stderr


def test_a_nursery_killed_while_warming_ipython_leaves_nothing_in_the_temporary_directory(
    tmp_path,
):
    # The server stopped while its nursery warmed up: PR_SET_DEATHSIG kills
    # the nursery on the spot. What it made is in the kernels' root (in the
    # runtime directory, which the server removes), not in /tmp.
    script = """
import os, sys
from IPython.core.interactiveshell import InteractiveShell
from cellmux.kernel import memory
def killed(*args, **kwargs):
    os._exit(9)
InteractiveShell.instance = classmethod(killed)
memory.warm_ipython(sys.argv[1])
"""
    tmp, kernels = tmp_path / "tmp", tmp_path / "kernels"
    tmp.mkdir()
    kernels.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", script, str(kernels)],
        cwd=tmp_path,
        env=dict(os.environ, TMPDIR=str(tmp)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 9, done.stderr
    assert os.listdir(tmp) == []
    assert [p.name[:16] for p in kernels.iterdir()] == ["cellmux-ipython-"]


def test_filling_the_allocator_holes_leaves_none_and_stderr_where_it_was(tmp_path):
    # In a fresh interpreter, as in the nursery: objects freed in between
    # others leave holes that the next allocations would take (in a kernel:
    # on pages shared with the nursery, each copied on its first write).
    script = """
import os, sys
from cellmux.kernel import memory
kept = [bytes(i % 400) for i in range(200_000)]
del kept[::2]
holes = sum(memory._free_blocks_by_size().values())
filled = memory.fill_allocator_holes()
left = sum(memory._free_blocks_by_size().values())
os.write(2, b"stderr still works")
print(holes > 50_000, filled >= holes, left < holes // 20)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.stdout.strip() == "True True True", done.stderr
    assert done.stderr == "stderr still works"


def test_kernels_are_forked_with_the_allocator_holes_filled(kernel):
    result = kernel.execute(
        "import cellmux.kernel.memory as m\n"
        "print(len(m._hole_fillers) > 1000, len(m._malloc_fillers) > 100)"
    )
    assert result.stdout.strip() == "True True"


def test_an_idle_kernel_imports_nothing_the_nursery_did_not(kernel):
    # An import after the fork costs ~0.9 MB of private memory (the import
    # machinery writes to objects on many shared pages): every module a
    # kernel needs to start and run a cell is preloaded.
    result = kernel.execute(
        "import sys, cellmux.kernel.memory as m\n"
        "print(list(sys.modules)[m._at_fork[0]:], m.unchanged_since_fork())"
    )
    assert result.stdout.strip() == "[] True"


def _in_fresh_interpreter(script: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )


def test_the_code_a_child_ran_is_named_in_first_call_order(tmp_path):
    # In a fork, the ids are the parent's own code objects; code the child
    # did not run (never_called) is not named, nor is the parent's own.
    script = """
import threading
from cellmux.kernel import memory
def first(): return second() + 1
def second(): return 1
def in_a_thread(): return 2
def never_called(): return 3
def work():
    first()
    t = threading.Thread(target=in_a_thread)
    t.start(); t.join()
order = memory.code_run_by(work)
where = {id(f.__code__): f.__name__ for f in (first, second, in_a_thread, never_called)}
print([where[i] for i in order if i in where])
"""
    done = _in_fresh_interpreter(script, tmp_path)
    assert done.stdout.strip() == "['first', 'second', 'in_a_thread']", done.stderr


def test_a_failed_or_stuck_rehearsal_raises_and_leaves_no_child(tmp_path):
    script = """
import os, time
from cellmux.kernel import memory
for work, timeout in ((lambda: 1 / 0, 30), (lambda: time.sleep(60), 0.5)):
    try:
        memory.code_run_by(work, timeout=timeout)
    except RuntimeError as e:
        print(str(e).split(" (")[0])
try:
    os.waitpid(-1, os.WNOHANG)
except ChildProcessError:
    print("no child left")
"""
    done = _in_fresh_interpreter(script, tmp_path)
    assert done.stdout.splitlines() == [
        "the rehearsal failed",
        "the rehearsal took more than 0.5 s",
        "no child left",
    ], done.stderr


def test_gathered_code_is_copied_together_and_still_runs(tmp_path):
    # Each function the rehearsal ran gets a copy of its code, made one
    # after the other; closures and comprehensions made later (from the
    # enclosing code's constants) use the copies too; the rest is left.
    script = """
import gc
from cellmux.kernel import memory
def adder(n):
    def add(x):
        return x + n
    return add
def squares(k):
    return [i * i for i in range(k)]
def never_called():
    return "untouched"
def work():
    adder(1)(2)
    squares(3)
functions = (adder, squares, never_called)
old = {f.__name__: f.__code__ for f in functions}
order = memory.code_run_by(work)
gc.collect()
count = memory.gather_code(order)
new = {f.__name__: f.__code__ for f in functions}
closure = adder(5)
print(count >= 4, new["adder"] is not old["adder"], new["squares"] is not old["squares"],
      new["never_called"] is old["never_called"])
print(closure(1), squares(4), never_called())
ids = {id(c) for c in memory._gathered_code}
print(id(closure.__code__) in ids, new["adder"] == old["adder"])
"""
    done = _in_fresh_interpreter(script, tmp_path)
    assert done.stdout.splitlines() == [
        "True True True True",
        "6 [0, 1, 4, 9] untouched",
        "True True",
    ], done.stderr


def test_gathered_code_fills_few_pages(tmp_path):
    # The code a child runs is scattered among code it does not run (as a
    # module's functions are, used or not); copied together after the
    # allocator's holes are filled, it fills few pages of its own.
    script = """
import sys
from cellmux.kernel import memory
functions = []
for i in range(600):
    names = {}
    exec(f"def f{i}(x):\\n    return x + {i}\\n", names)
    functions.append(names[f"f{i}"])
run = functions[::4]
def pages(codes):
    return len({a // 4096 for c in codes for a in (id(c), id(c) + sys.getsizeof(c) - 1)})
before = pages(f.__code__ for f in run)
order = memory.code_run_by(lambda: [f(1) for f in run])
memory.fill_allocator_holes()
memory.gather_code(order)
after = pages(f.__code__ for f in run)
print(before > 20, after * 2 < before, [f(1) for f in run[:3]])
"""
    done = _in_fresh_interpreter(script, tmp_path)
    assert done.stdout.strip() == "True True [1, 5, 9]", (done.stdout, done.stderr)


def test_kernels_run_the_code_the_nursery_gathered(kernel):
    # The nursery rehearsed a kernel's start and first cells: the code of
    # the request handlers every kernel runs was copied together for them.
    result = kernel.execute(
        "import cellmux.kernel.memory as m, ipykernel.ipkernel as k, cellmux.kernel.pump as p\n"
        "ids = {id(c) for c in m._gathered_code}\n"
        "print(len(ids) > 500, id(k.IPythonKernel.do_execute.__code__) in ids,"
        " id(p.Pump._relay.__code__) in ids)"
    )
    assert result.stdout.strip() == "True True True"


def test_filling_the_malloc_holes_sends_new_blocks_to_the_heap_top(tmp_path):
    # In a fresh interpreter, as in the nursery: blocks freed between live
    # ones (over 512 bytes: glibc's, not pymalloc's) would take a kernel's
    # next allocations, each on a page shared with the nursery.
    script = """
import ctypes
from cellmux.kernel import memory
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
kept = [bytearray(3000) for _ in range(3000)]
del kept[::2]
end_before = libc.sbrk(0)
filled = memory.fill_malloc_holes()
after = [bytearray(3000) for _ in range(50)]
# A bytearray's buffer is its own malloc'd block; id() is the object.
addresses = [ctypes.addressof((ctypes.c_char * 1).from_buffer(b)) for b in after]
below = sum(a < end_before - 4 * 1024 * 1024 for a in addresses)
print(filled > 1500 * 3000, below)
"""
    done = _in_fresh_interpreter(script, tmp_path)
    assert done.stdout.strip() == "True 0", (done.stdout, done.stderr)


def test_a_failed_rehearsal_costs_the_nursery_only_the_saving(tmp_path):
    # The gathering is a saving, not a need: a rehearsal that fails is
    # logged, its directory removed, and no code is replaced.
    script = """
import os
from cellmux.kernel import child, memory, nursery
def broken(scratch, env):
    open(os.path.join(scratch, "left"), "w").close()
    raise RuntimeError("no kernel today")
child.rehearse_start = broken
root = os.path.abspath("kernels")
os.mkdir(root)
nursery._gather_kernel_code(nursery.NurseryConfig(endpoint="ipc://x", workdir_root=root))
print(os.listdir(root), memory._gathered_code)
"""
    done = _in_fresh_interpreter(script, tmp_path)
    assert done.stdout.strip() == "[] []", (done.stdout, done.stderr)
    assert "gathering kernels' code skipped: RuntimeError('the rehearsal failed" in done.stderr


def test_the_rehearsal_runs_no_startup_or_configuration_file_the_environment_names(tmp_path):
    # Unsandboxed (as root: root), the rehearsal must not run files that
    # the kernels' environment points IPython and Jupyter at. The same
    # rehearsal with those variables kept runs all three (the test's check).
    script = """
import os
from cellmux.kernel import child, memory, nursery
here = os.getcwd()
def touching(name):
    return f"open({os.path.join(here, name)!r}, 'w').close()\\n"
os.makedirs("ipython/profile_default/startup")
open("startup.py", "w").write(touching("ran-pythonstartup"))
open("ipython/profile_default/ipython_kernel_config.py", "w").write(touching("ran-config"))
open("ipython/profile_default/startup/00.py", "w").write(touching("ran-ipython-startup"))
env = {
    "HOME": ".",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    "PYTHONSTARTUP": os.path.abspath("startup.py"),
    "IPYTHONDIR": os.path.abspath("ipython"),
}
nursery._preload(())
for unset in ((), child._REHEARSAL_UNSET):
    child._REHEARSAL_UNSET = unset
    os.makedirs("scratch")
    ran = memory.code_run_by(lambda: child.rehearse_start(os.path.abspath("scratch"), env))
    print(len(ran) > 500, sorted(name for name in os.listdir(".") if name.startswith("ran-")))
    for name in os.listdir("."):
        if name.startswith("ran-"):
            os.remove(name)
    import shutil; shutil.rmtree("scratch")
"""
    done = _in_fresh_interpreter(script, tmp_path)
    assert done.stdout.splitlines() == [
        "True ['ran-config', 'ran-ipython-startup', 'ran-pythonstartup']",
        "True []",
    ], (done.stdout, done.stderr[-3000:])


# -- same-page merging (KSM), the operator's opt-in ---------------------------


def _uss(pid: int) -> int:
    """Bytes of memory only this process maps (its private pages)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f.read().splitlines()[1:])
    return sum(int(fields[name].split()[0]) * 1024 for name in ("Private_Clean", "Private_Dirty"))


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _ksm_stat(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/ksm_stat") as f:
        return dict(line.replace(":", "").split(None, 1) for line in f.read().splitlines())


def test_offering_pages_one_mapping_at_a_time(tmp_path):
    # Without CAP_SYS_RESOURCE (a kernel after its sandbox, a nursery not
    # run as root) the process offers the mappings it has, by madvise.
    script = """
from cellmux.kernel import memory
def stat():
    lines = open("/proc/self/ksm_stat").read().splitlines()
    return {k.rstrip(":"): v for k, v in (line.split(None, 1) for line in lines)}
before = stat()
how = memory.offer_pages_for_merging(whole_process=False)
after = stat()
print(before["ksm_mergeable"], before["ksm_merge_any"], how, after["ksm_mergeable"],
      after["ksm_merge_any"])
"""
    done = _in_fresh_interpreter(script, tmp_path)
    assert done.stdout.strip() == "no no mappings yes no", (done.stdout, done.stderr)


def test_kernels_offer_no_page_for_merging_unless_the_operator_says_so(server):
    # Merged pages are a timing channel between kernels (security.md).
    with server.client() as client:
        model = client.create_kernel()
        try:
            pid = client.get_kernel(model.id).pid
            stat = _ksm_stat(pid)
            assert (stat["ksm_merge_any"], stat["ksm_mergeable"]) == ("no", "no")
        finally:
            client.delete_kernel(model.id)


def test_with_kernel_page_merging_kernels_offer_their_pages_and_the_nursery_does_not():
    running = start_server(
        "--pool-size", "1", "--config", config_file("kernel_page_merging = true")
    )
    try:
        with running.client() as client:
            model = client.create_kernel()
            with client.connect(model.id) as kernel:
                assert kernel.execute("1 + 1").result_text == "2"
            kernel_pid = client.get_kernel(model.id).pid
            nursery_pid = _parent(kernel_pid)
            stat = _ksm_stat(kernel_pid)
            # As root, the whole process (prctl, before the sandbox drops the
            # capability it needs); otherwise its mappings, one by one.
            whole = "yes" if os.geteuid() == 0 else "no"
            assert (stat["ksm_merge_any"], stat["ksm_mergeable"]) == (whole, "yes")
            nursery = _ksm_stat(nursery_pid)
            assert (nursery["ksm_merge_any"], nursery["ksm_mergeable"]) == ("no", "no")
        if not memory.page_merging_running():
            assert "the kernel's KSM daemon is not running" in running.log()
    finally:
        running.stop()


def _merging_server() -> RunningServer:
    return start_server("--pool-size", "1", "--config", config_file("kernel_page_merging = true"))


@contextlib.contextmanager
def _ksm_running(pages_to_scan: int) -> Iterator[None]:
    """ksmd on, scanning fast; its settings put back whatever happens."""
    names = ("run", "pages_to_scan", "sleep_millisecs")
    saved = {name: Path(KSM, name).read_text() for name in names}
    try:
        Path(KSM, "pages_to_scan").write_text(str(pages_to_scan))
        Path(KSM, "sleep_millisecs").write_text("10")
        Path(KSM, "run").write_text("1")
        yield
    finally:
        for name in ("pages_to_scan", "sleep_millisecs", "run"):
            Path(KSM, name).write_text(saved[name])


def test_ksm_merges_what_kernels_have_alike_and_their_private_memory_falls():
    # The figures (docs/benchmarks.md): about 14 MB of private memory per
    # idle kernel, of which about 70 % is byte-identical across kernels.
    running = start_server(
        "--pool-size", "1", "--config", config_file("kernel_page_merging = true")
    )
    try:
        with running.client() as client:
            pids = []
            for _ in range(3):
                model = client.create_kernel()
                with client.connect(model.id) as kernel:
                    assert kernel.execute("print(1 + 1)").stdout == "2\n"
                pids.append(client.get_kernel(model.id).pid)
            before = [_uss(pid) for pid in pids]
            with _ksm_running(pages_to_scan=5000):
                # Two full scans: pages are merged on the second they are seen alike.
                scans = int(Path(KSM, "full_scans").read_text()) + 3
                wait_for(
                    lambda: int(Path(KSM, "full_scans").read_text()) >= scans,
                    timeout=240,
                    interval=0.5,
                )
                after = [_uss(pid) for pid in pids]
                nursery = _ksm_stat(_parent(pids[0]))
            assert all(a < b * 0.6 for a, b in zip(after, before, strict=True)), (before, after)
            assert nursery["ksm_merging_pages"] == "0"
            # Merged kernels still run, and their writes get their own copies.
            model = client.list_kernels()[0]
            with client.connect(model.id) as kernel:
                assert kernel.execute("x = [1] * 1000; sum(x)").result_text == "1000"
    finally:
        running.stop()
