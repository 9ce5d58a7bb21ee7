"""numba compilations are serialised across processes that share a kernel cache
(adaspec.runtime.cache_lock): a second process waits while another holds the lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

fcntl = pytest.importorskip("fcntl")
pytest.importorskip("numba")

_CHILD = """
import numpy as np
import adaspec.runtime.kernels  # sets numba up, installs the lock
from numba import njit

@njit
def twice(x):
    return 2 * x

print("compiled", twice(np.int64(21)), flush=True)
"""


def test_a_compilation_waits_for_the_lock_and_releases_it(tmp_path):
    cache = tmp_path / "numba"
    cache.mkdir()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    with open(cache / "compile.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is compiling
        child = subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(6.0)  # ample time to import and compile, were it not waiting
            assert child.poll() is None, f"compiled without the lock: {child.communicate()}"
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert "compiled 42" in out
    with open(cache / "compile.lock", "a+") as again:  # the child let go of it
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_lock_is_held_only_during_a_compilation(tmp_path):
    import numpy as np
    from numba import njit
    from numba.core import event

    from adaspec.runtime.cache_lock import CacheLock

    lock = CacheLock(tmp_path / "c" / "compile.lock")
    seen = []

    @njit
    def probe(x):
        return x + 1

    class Peek(event.Listener):  # registered after ``lock``: runs while it holds the file
        def on_start(self, ev):
            with open(lock.path, "a+") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen.append("free")
                except BlockingIOError:
                    seen.append("held")

        def on_end(self, ev):
            pass

    peek = Peek()
    event.register("numba:compiler_lock", lock)
    event.register("numba:compiler_lock", peek)
    try:
        assert probe(np.int64(1)) == 2
    finally:
        event.unregister("numba:compiler_lock", peek)
        event.unregister("numba:compiler_lock", lock)
    assert seen and seen[0] == "held"
    with open(lock.path, "a+") as fh:  # released at the end
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_an_unwritable_cache_directory_does_not_stop_compilation(tmp_path):
    import numpy as np
    from numba import njit
    from numba.core import event

    from adaspec.runtime.cache_lock import CacheLock

    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    lock = CacheLock(blocked / "numba" / "compile.lock")  # its folder cannot be made

    @njit
    def plus(x):
        return x + 2

    event.register("numba:compiler_lock", lock)
    try:
        assert plus(np.int64(1)) == 3
    finally:
        event.unregister("numba:compiler_lock", lock)
    assert lock._depth == 0 and lock._fh is None
