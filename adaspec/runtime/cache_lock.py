"""One numba compilation at a time per kernel cache, across processes.

numba's on-disk cache is not safe against two processes compiling kernels of one module at
once: each reads the cache index, picks the same free data-file number for its own
signature and writes it, so the index can end up naming another signature's machine code,
and the process that later loads it crashes (seen with ``pytest -n 2`` on an empty cache).
:func:`install` makes every process that uses adaspec's kernels hold an exclusive ``flock``
on ``<cache>/compile.lock`` while numba's compiler lock is held (cache lookup, compilation
and cache write happen under it), so one process compiles and writes while the others
wait, then load what it wrote. Nothing happens where ``fcntl`` does not exist, or where the
cache directory cannot be written (numba then compiles without caching).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import IO

from numba.core import event

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

_installed: set[str] = set()


class CacheLock(event.Listener):
    """Holds the file lock while any thread of this process is inside numba's compiler lock
    (its events nest: a depth count decides when to take and to drop the file lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._depth = 0
        self._mutex = threading.Lock()
        self._fh: IO[str] | None = None

    def on_start(self, ev: event.Event) -> None:
        with self._mutex:
            self._depth += 1
            if self._depth == 1:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._fh = open(self.path, "a+")  # noqa: SIM115 (held until on_end)
                    fcntl.flock(self._fh, fcntl.LOCK_EX)
                except OSError:  # an unwritable cache: numba compiles without caching anyway
                    if self._fh is not None:
                        self._fh.close()
                    self._fh = None

    def on_end(self, ev: event.Event) -> None:
        with self._mutex:
            self._depth -= 1
            if self._depth == 0 and self._fh is not None:
                fcntl.flock(self._fh, fcntl.LOCK_UN)
                self._fh.close()
                self._fh = None


def install(cache: Path) -> None:
    """Serialise this process's numba compilations with every other process's that share
    ``cache`` (once per cache directory and process)."""
    if fcntl is None:
        return
    key = str(Path(cache).resolve())
    if key not in _installed:
        _installed.add(key)
        event.register("numba:compiler_lock", CacheLock(Path(key) / "compile.lock"))
