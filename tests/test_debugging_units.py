"""cellmux.kernel.debugging's patch of debugpy's file check, without a kernel:
a name counts as existing when linecache holds it as sent code, and any
other kind of linecache entry leaves the answer to debugpy."""

from __future__ import annotations

import linecache
import sys
import types

from cellmux.kernel.debugging import _sent_files_exist_for_debugpy


def _patched(monkeypatch) -> types.ModuleType:
    utils = types.ModuleType("pydevd_file_utils")
    utils.exists = lambda filename: filename == "/on/disk.py"
    monkeypatch.setitem(sys.modules, "pydevd_file_utils", utils)
    kernel = types.SimpleNamespace(debugger=types.SimpleNamespace(start=lambda: True))
    _sent_files_exist_for_debugpy(kernel)
    assert kernel.debugger.start() is True
    return utils


def test_sent_code_exists_and_other_entries_ask_debugpy(monkeypatch):
    utils = _patched(monkeypatch)
    sent = ["x = 1\n"]
    monkeypatch.setitem(linecache.cache, "/client/only.py", (6, None, sent, "/client/only.py"))
    # linecache.lazycache's entries are 1-tuples (a function to get the lines).
    monkeypatch.setitem(linecache.cache, "/lazy/module.py", (lambda: sent,))
    monkeypatch.setitem(linecache.cache, "/read/from/disk.py", (6, 1.0, sent, "/read/from/disk.py"))
    assert utils.exists("/client/only.py")
    assert utils.exists("/on/disk.py")
    assert not utils.exists("/lazy/module.py")
    assert not utils.exists("/read/from/disk.py")
    assert not utils.exists("/nowhere.py")
