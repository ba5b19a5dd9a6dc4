"""Child processes we start (i-PI, socket clients, mpiexec, isolated oracles): stopping them without leaving zombies
or waiting forever, and making them die with us."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> int | None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code (None if it was never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def die_with_parent(sig: int = signal.SIGTERM):
    """In a child (before exec, or first thing in a Python child; Linux): receive ``sig`` when the process that
    started it dies, even by SIGKILL, so that a killed parent leaves nothing behind.  Elsewhere a no-op."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs.  A zombie (exited, not yet reaped: an MPI rank whose parent
    died is reparented, and some init processes reap late) counts as dead; a process we may not signal counts as
    alive."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError, IndexError):
        return True
