"""The run-directory lock: one training run writes to a ``run_dir`` at a time.

``RUN_DIR/.lock`` is locked with ``fcntl.flock`` by the process that runs (rank 0 of a
multi-process run) and records that process's pid and host. flock rather than an ``O_EXCL`` file:
the kernel releases a flock when its process ends in any way (exit, exception, ``kill -9``), so a
crash can never leave the directory locked, whereas an ``O_EXCL`` file outlives its process and
only a pid check guesses whether it is stale (a pid that the system has since reused reads as
alive). The pid and host in the file serve the error message, and tell a lock left by a process
that is gone (the file still names it, nothing holds it) apart from a clean release (the file is
emptied): the next run takes it over and says so. On a network file system flock is as good as
that file system's locking (NFSv4 and Lustre with ``flock`` honour it across hosts).
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from typing import Callable


class RunDirError(ValueError):
    """The run directory cannot be taken: another process holds it, or it is not a directory."""


class RunDirLock:
    """Hold ``RUN_DIR/.lock`` while the run writes: ``with RunDirLock(run_dir, log=print): ...``.

    ``acquire`` raises RunDirError, naming the holder's pid and host, when another process holds
    it; ``release`` empties the file and unlocks it.
    """

    def __init__(self, run_dir: str, *, log: Callable[[str], None] = lambda _: None):
        self.run_dir, self.log = run_dir, log
        self.path = os.path.join(run_dir, ".lock")
        self.fd: int | None = None
        self.created = False   # acquire made the directory

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            raise RunDirError(f"run_dir {self.run_dir} is a file, not a directory")
        self.created = not os.path.exists(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid, host = _holder(self.path)
            raise RunDirError(f"run_dir {self.run_dir} is in use by pid {pid} on {host} (it "
                              f"holds {self.path}); wait for that run to end or give this run "
                              f"another run_dir") from None
        previous = os.read(fd, 256).decode(errors="replace").split()
        if previous:  # locked by nobody, yet it names a process: that process died holding it
            self.log(f"evo: taking over the lock of {self.run_dir} from pid {previous[0]} on "
                     f"{' '.join(previous[1:]) or '?'}, which ended without releasing it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty file: released cleanly
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
            if self.created and os.listdir(self.run_dir) == [".lock"]:
                # a run that stopped before writing anything leaves no directory behind
                os.remove(self.path)
                os.rmdir(self.run_dir)


def _holder(path: str) -> tuple[str, str]:
    """(pid, host) written in the lock file; the holder writes them just after locking, so an
    empty file is read again for a moment."""
    for _ in range(50):
        try:
            with open(path) as f:
                words = f.read().split()
        except OSError:
            words = []
        if len(words) >= 2:
            return words[0], words[1]
        time.sleep(0.01)
    return "?", "?"
