# -*- test-case-name: tests.test_kernel_memory -*-
"""Keeping each kernel's private memory small.

A forked kernel shares the nursery's memory page by page until it writes
to a page, and in CPython 3.11 merely using an object writes to it (its
reference count). So what a kernel touches while it starts decides most of
its private memory (docs/benchmarks.md, "Memory per idle kernel").

The biggest single toucher was one line of ipykernel: ``IPythonKernel``
lists the file of every loaded module for its debugger (which treats those
files as library code, never the user's), and reading ``__file__`` off
~650 module objects scattered over the nursery's heap made about 2.5 MB of
each kernel private, for a list of strings. The nursery now makes that
list once, before it forks (L{record_module_files}); while a kernel builds
its ``IPythonKernel``, ipykernel gets the same list from it
(L{modules_listed_at_fork}), without touching a module. If the kernel has
loaded or dropped a module since the fork, the list would not be the same,
so ipykernel lists the modules itself, as stock does.

The other thing the nursery does for its kernels is L{warm_ipython}: the
first IPython shell a process builds, and the first cell it runs, fill
module- and class-level caches (compiled patterns, lazily made objects).
Built once in the nursery, they are shared instead of made in every kernel.
"""

from __future__ import annotations

import array
import atexit
import builtins
import contextlib
import gc
import io
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import CodeType, FunctionType, ModuleType
from typing import Any

__all__ = [
    "KSM_RUN",
    "code_run_by",
    "fill_allocator_holes",
    "fill_malloc_holes",
    "gather_code",
    "modules_listed_at_fork",
    "offer_pages_for_merging",
    "page_merging_running",
    "record_module_files",
    "warm_ipython",
]


class _ModuleFile:
    """Stands in for a module in ipykernel's listing: only its file."""

    __slots__ = ("__file__",)

    def __init__(self, file: str) -> None:
        self.__file__ = file


#: (number of modules, the newest module's name, name -> stand-in), as the
#: nursery had them when it was ready to fork; None outside a nursery.
_at_fork: tuple[int, str, dict[str, _ModuleFile]] | None = None
#: Whether ipykernel got its module list from the nursery in this process.
used_list_from_nursery = False


def record_module_files() -> None:
    """Remember every loaded module's file; call in the nursery, last thing
    before forking is possible (after the preloads)."""
    global _at_fork
    listed = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and file:
            # A copy made now lies next to the other copies, in a few
            # pages, instead of next to the module's other objects.
            listed[name] = _ModuleFile(
                file.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")
            )
    _at_fork = (len(sys.modules), next(reversed(sys.modules)), listed)


def unchanged_since_fork() -> bool:
    """Whether this process has the modules the nursery listed."""
    return (
        _at_fork is not None
        and len(sys.modules) == _at_fork[0]
        and next(reversed(sys.modules)) == _at_fork[1]
    )


class _ModulesAtFork:
    """``sys.modules``, except that ``copy()`` returns the nursery's list."""

    def __init__(self, listed: dict[str, _ModuleFile]) -> None:
        self._listed = listed

    def copy(self) -> dict[str, _ModuleFile]:
        return dict(self._listed)

    def __getattr__(self, name: str):
        return getattr(sys.modules, name)

    def __getitem__(self, name: str):
        return sys.modules[name]

    def __contains__(self, name: object) -> bool:
        return name in sys.modules

    def __iter__(self) -> Iterator[str]:
        return iter(sys.modules)

    def __len__(self) -> int:
        return len(sys.modules)


class _SysWithModulesAtFork:
    """The ``sys`` module, seen through L{_ModulesAtFork}."""

    def __init__(self, modules: _ModulesAtFork) -> None:
        self.modules = modules

    def __getattr__(self, name: str):
        return getattr(sys, name)


@contextlib.contextmanager
def modules_listed_at_fork(module: ModuleType) -> Iterator[bool]:
    """While in the block, C{module}'s ``sys.modules.copy()`` gives the
    nursery's list (if it is still true); yields whether it does."""
    at_fork = _at_fork
    if at_fork is None or not unchanged_since_fork() or getattr(module, "sys", None) is not sys:
        yield False
        return
    global used_list_from_nursery
    patched: Any = module  # its global ``sys`` is swapped for the block
    patched.sys = _SysWithModulesAtFork(_ModulesAtFork(at_fork[2]))
    try:
        yield True
    finally:
        patched.sys = sys
    used_list_from_nursery = True


@contextlib.contextmanager
def _jedi_cache_in(directory: str) -> Iterator[None]:
    try:
        import jedi
    except ImportError:
        yield
        return
    saved = jedi.settings.cache_directory
    jedi.settings.cache_directory = os.path.join(directory, "jedi")
    try:
        yield
    finally:
        jedi.settings.cache_directory = saved


def warm_ipython(directory: str | None = None) -> None:
    """Build a throwaway IPython shell and run one cell in it; put back
    everything a shell changes in the process. Call in the nursery only.

    Its IPython directory is made in C{directory} (the kernels' root, in
    the server's runtime directory), else in the temporary directory: a
    nursery killed while it warms up (its server stopped then) cannot
    remove it, and the server removes its runtime directory, not /tmp.
    """
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    saved_sys = {
        name: getattr(sys, name) for name in ("displayhook", "excepthook", "stdout", "stderr")
    }
    saved_main = sys.modules.get("__main__")
    saved_builtins = dict(vars(builtins))
    saved_environ = dict(os.environ)
    saved_path = list(sys.path)
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ipython_dir = tempfile.mkdtemp(prefix="cellmux-ipython-", dir=directory)
    try:
        shell = InteractiveShell.instance(config=config, ipython_dir=ipython_dir)
        atexit.unregister(shell.atexit_operations)
        with contextlib.redirect_stdout(io.StringIO()):
            shell.run_cell("1+1", store_history=False)
        # jedi's first completion (parso's grammar, the stubs of builtins
        # and os) takes seconds: made here once, its caches are every
        # kernel's (cellmux.kernel.introspection falls back on jedi).
        # Its disk cache goes to a directory of ours, removed below (not the
        # server user's ~/.cache); what it keeps in memory stays.
        from IPython.core.completer import provisionalcompleter

        with provisionalcompleter(), _jedi_cache_in(ipython_dir):
            list(shell.Completer.completions("import os; os.pa", 16))
        if shell.history_manager is not None:
            shell.history_manager.end_session()
    finally:
        InteractiveShell.clear_instance()
        for name, value in saved_sys.items():
            setattr(sys, name, value)
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
        names = vars(builtins)
        for name in set(names) - set(saved_builtins):
            del names[name]
        names.update(saved_builtins)
        if os.environ != saved_environ:
            os.environ.clear()
            os.environ.update(saved_environ)
        sys.path[:] = saved_path
        shutil.rmtree(ipython_dir, ignore_errors=True)


#: What fill_allocator_holes allocated: kept for the nursery's life, never
#: touched again (bytes and floats hold no references and are not tracked
#: by the GC), so their pages stay shared with every kernel.
_hole_fillers: list[object] = []

#: Bytes of a bytes object's header (sys.getsizeof(b"")).
_BYTES_HEADER = sys.getsizeof(b"")


def _free_blocks_by_size() -> dict[int, int]:
    """Block size -> free blocks in pymalloc's partly used pools (from
    sys._debugmallocstats, which writes to file descriptor 2)."""
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
    free: dict[int, int] = {}
    for line in text.splitlines():
        fields = line.split()
        # class, size, pools, blocks in use, available blocks
        if len(fields) == 5 and all(f.isdigit() for f in fields):
            free[int(fields[1])] = int(fields[4])
    return free


def fill_allocator_holes() -> int:
    """Fill the free blocks of the nursery's partly used allocator pools;
    how many blocks were filled. Call in the nursery, last before forking.

    Warming up (jedi's first completion above all) frees many objects and
    leaves holes in pages of preloaded objects. pymalloc hands out those
    holes first, so a kernel's first allocations would land on hundreds of
    shared pages and copy each one (+2.5 MB of private memory per kernel
    for jedi's warm-up alone). Filled here with inert objects, the holes
    cost the nursery their blocks once, and a kernel's allocations go to
    fresh pools of its own instead.
    """
    if not hasattr(sys, "_debugmallocstats"):
        return 0  # not CPython's allocator: nothing known to fill
    filled = 0
    for _ in range(2):  # the first pass's own allocations make a few more
        for size, count in _free_blocks_by_size().items():
            length = size - _BYTES_HEADER
            if length >= 0:
                _hole_fillers.extend(bytes(length) for _ in range(count))
            elif size == 32:  # a float takes 24 bytes, in the 32-byte class
                _hole_fillers.extend(float(i) + 0.5 for i in range(count))
            else:
                continue
            filled += count
    return filled


#: Longest the nursery waits for a rehearsal (L{code_run_by}) to finish.
REHEARSAL_TIME = 60.0


def code_run_by(work: Callable[[], object], timeout: float = REHEARSAL_TIME) -> list[int]:
    """Run C{work} in a forked child under a profiler; the ids of the code
    objects it ran (in every thread), in the order of their first call.

    A fork has the same addresses as its parent, so the ids name the
    parent's own code objects. Raises L{RuntimeError} if the child fails,
    or takes more than C{timeout} seconds (it is killed).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 70
        try:
            os.close(read_end)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            seen: dict[int, None] = {}

            def profile(frame: Any, event: str, arg: object) -> None:
                if event == "call":
                    seen.setdefault(id(frame.f_code), None)

            threading.setprofile(profile)
            sys.setprofile(profile)
            work()
            sys.setprofile(None)
            threading.setprofile(None)
            data = array.array("q", list(seen)).tobytes()
            view = memoryview(data)
            while view:
                view = view[os.write(write_end, view) :]
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise RuntimeError(f"the rehearsal took more than {timeout:g} s")
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise RuntimeError(f"the rehearsal failed (wait status {status})")
    ids = array.array("q")
    ids.frombytes(b"".join(chunks))
    return ids.tolist()


#: Code objects replaced by L{gather_code}: kept, untouched, so that their
#: memory is never handed out again (a kernel's allocations landing there
#: would copy shared pages).
_replaced_code: list[CodeType] = []
#: Their copies, in the order they were made.
_gathered_code: list[CodeType] = []


def gather_code(order: Sequence[int]) -> int:
    """Give the functions whose code objects have the ids in C{order} new
    copies of them, made one after another in that order; how many.

    Python 3.11 writes to a code object every time its function is called
    (a reference count) and as it specialises its bytecode: each function
    a kernel runs copies the page its code object sits on, shared with
    code no kernel runs. Made together, the code every kernel runs fills
    few pages of its own. Call in the nursery, after the warm-ups.
    """
    wanted = {code_id: rank for rank, code_id in enumerate(order)}
    users: dict[int, list[FunctionType]] = {}
    codes: dict[int, CodeType] = {}
    for thing in gc.get_objects():
        if type(thing) is FunctionType:
            users.setdefault(id(thing.__code__), []).append(thing)
            codes[id(thing.__code__)] = thing.__code__
    # Code made into functions only when its enclosing function runs
    # (closures, lambdas, comprehensions) is reached through co_consts.
    stack = list(codes.values())
    while stack:
        for const in stack.pop().co_consts:
            if type(const) is CodeType and id(const) not in codes:
                codes[id(const)] = const
                stack.append(const)
    copies: dict[int, CodeType] = {}

    def copy(code: CodeType) -> CodeType:
        made = copies.get(id(code))
        if made is None:
            consts = code.co_consts
            if any(type(c) is CodeType and id(c) in wanted for c in consts):
                consts = tuple(
                    copy(c) if type(c) is CodeType and id(c) in wanted else c for c in consts
                )
            made = copies[id(code)] = code.replace(co_consts=consts)
            _replaced_code.append(code)
            _gathered_code.append(made)
        return made

    for code_id in order:
        if code_id in codes:
            copy(codes[code_id])
    for code_id, made in copies.items():
        for function in users.get(code_id, ()):
            function.__code__ = made
    return len(copies)


#: Blocks fill_malloc_holes took from glibc's heap: never freed.
_malloc_fillers: list[int] = []


def fill_malloc_holes() -> int:
    """Take the free chunks of glibc's main heap below its top chunk; how
    many bytes. Call in the nursery (single-threaded), last before forking.

    What a kernel mallocs (blocks over 512 bytes, SQLite's, libzmq's)
    would otherwise be carved from chunks freed between the nursery's live
    ones, copying a shared page for each, and every split or merge writes
    the headers of the neighbouring chunks too.
    """
    try:
        import ctypes

        class MallInfo2(ctypes.Structure):
            # glibc's struct mallinfo2: ten size_t fields, keepcost last.
            _fields_ = [(f"field{i}", ctypes.c_size_t) for i in range(9)] + [
                ("keepcost", ctypes.c_size_t)
            ]

        libc = ctypes.CDLL(None, use_errno=True)
        malloc, free, sbrk, mallinfo2 = libc.malloc, libc.free, libc.sbrk, libc.mallinfo2
    except (OSError, AttributeError):
        return 0  # not glibc
    malloc.restype = ctypes.c_void_p
    malloc.argtypes = [ctypes.c_size_t]
    free.argtypes = [ctypes.c_void_p]
    sbrk.restype = ctypes.c_void_p
    sbrk.argtypes = [ctypes.c_ssize_t]
    mallinfo2.restype = MallInfo2
    taken = 0
    for size in (1 << 16, 1 << 14, 1 << 12, *range(1024, 0, -16)):
        top = (sbrk(0) or 0) - mallinfo2().keepcost
        while True:
            block = malloc(size)
            if not block:
                break
            if block >= top:  # from the top chunk (or mmap): no hole left
                free(block)
                break
            _malloc_fillers.append(block)
            taken += size
    return taken


#: prctl(2) option: every mapping of the process, present and future, may be
#: merged by KSM (Linux 6.4+; needs CAP_SYS_RESOURCE). Kept across fork.
_PR_SET_MEMORY_MERGE = 67
#: madvise(2) advice: this range may be merged by KSM (Linux 2.6.32+).
_MADV_MERGEABLE = 12
#: Whether the kernel's same-page merging daemon runs ("1"), see L{page_merging_running}.
KSM_RUN = "/sys/kernel/mm/ksm/run"


def page_merging_running(path: str = KSM_RUN) -> bool:
    """Whether KSM's daemon (ksmd) is merging pages on this machine."""
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def offer_pages_for_merging(whole_process: bool = True) -> str:
    """Let KSM merge this process's pages with identical pages of the other
    processes that offer theirs (other kernels); how it was done.

    Kernels forked from one nursery run the same start: most of their
    private pages (about 70 %, docs/benchmarks.md) end byte-identical across
    kernels. Merged by ksmd, each is kept once, read-only, and copied again
    on its next write. Only on an operator's opt-in (``kernel_page_merging``:
    merged pages leak across kernels by timing, docs/security.md).

    ``"process"``: all of the process's memory, present and future
    (``PR_SET_MEMORY_MERGE``, which needs CAP_SYS_RESOURCE: a root
    nursery's child before it drops its privileges). ``"mappings"``: the
    private writable mappings there are now, by ``madvise`` (anyone; call
    again to cover mappings made since), also when C{whole_process} is
    false. ``""``: neither is possible (not Linux, or a kernel built
    without KSM).
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl, madvise = libc.prctl, libc.madvise
    except (OSError, AttributeError):
        return ""
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if whole_process and prctl(_PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0:
        return "process"
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    offered = 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        # Private and writable: what a process's own pages can be in.
        if len(fields) < 2 or not fields[1].startswith("rw") or fields[1][3] != "p":
            continue
        if len(fields) > 5 and fields[5] in ("[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        # A mapping KSM cannot take (VM_PFNMAP, ...) answers EINVAL: left out.
        if madvise(start, end - start, _MADV_MERGEABLE) == 0:
            offered += 1
    return "mappings" if offered else ""
