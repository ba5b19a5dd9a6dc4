"""Threads: Numba's for the kernels, one BLAS thread while a frame is evaluated, and the one large product of the
Bayesian errors split by hand.

Numba's OpenMP workers and OpenBLAS's thread pool both spin for a while after each parallel region.  Every small
BLAS call of a frame (the dot product of the harmonic energy, the N x 3 products of the frame mapping) woke
OpenBLAS's pool, whose spinning threads then took the cores from Numba's workers.  Measured on 2 cores, 12^3
BaTiO3 cell (8640 atoms), energy + forces + stress: 38 ms on one thread; with 2 Numba threads 30-42 ms when BLAS
had 2 threads too, 17 ms when it had one.  So a parallel evaluation runs inside :func:`one_blas_thread` (a few
microseconds to enter), and :func:`matmul` splits the one large product of the Bayesian errors over Python
threads (numpy releases the GIL), one per Numba thread.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numba
import numpy as np

_lock = threading.RLock()
_controller = None
_looked = 0.0
_active = 0          # blocks of one_blas_thread open in this process
_saved: list = []    # (library, its thread count) to restore when the last block closes
_pool: Optional[ThreadPoolExecutor] = None
_limited = threading.local()


def _blas_libraries() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded in this process (numpy's, and scipy's once loaded:
    looked up again while fewer than two are known, at most every 10 s)."""
    global _controller, _looked
    with _lock:
        now = time.monotonic()
        if _controller is None or (len(_controller.select(user_api="blas").lib_controllers) < 2
                                   and now - _looked > 10.0):
            from threadpoolctl import ThreadpoolController
            _controller, _looked = ThreadpoolController(), now
        return [lc for lc in _controller.lib_controllers if lc.user_api == "blas"]


@contextlib.contextmanager
def one_blas_thread():
    """BLAS on one thread inside the block.  The limit is process-wide (BLAS libraries allow no other way): the first
    block to enter sets it and the last to leave restores each library's own count, so blocks in several threads
    (one per server connection) and nested blocks are safe."""
    global _active, _saved
    with _lock:
        if _active == 0:
            _saved = []
            for lc in _blas_libraries():
                _saved.append((lc, lc.get_num_threads()))
                lc.set_num_threads(1)
        _active += 1
    _limited.depth = getattr(_limited, "depth", 0) + 1
    try:
        yield
    finally:
        _limited.depth -= 1
        with _lock:
            _active -= 1
            if _active == 0:
                for lc, n in _saved:
                    lc.set_num_threads(n)
                    # threadpoolctl lets only one thread set OpenBLAS's process-wide pool (the others silently do
                    # nothing) until it lets go: the next block may open in another thread
                    getattr(lc, "clear_controlling_thread", lambda: None)()
                _saved = []


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for a (m, k) and b (k, n): inside :func:`one_blas_thread` and with several Numba threads, b's columns
    are split over that many Python threads (each product on one BLAS thread); otherwise a plain product."""
    global _pool
    n = numba.get_num_threads()
    if n < 2 or b.ndim != 2 or b.shape[1] < 4096 or not getattr(_limited, "depth", 0):
        return a @ b
    with _lock:
        if _pool is None or _pool._max_workers != n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="sp_server-matmul")
        pool = _pool
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    edges = np.linspace(0, b.shape[1], n + 1).astype(int)

    def part(k):
        np.matmul(a, b[:, edges[k]:edges[k + 1]], out=out[:, edges[k]:edges[k + 1]])

    list(pool.map(part, range(n)))
    return out


def engine_environment(base: Optional[dict] = None) -> dict:
    """The environment for an engine process (i-PI) that shares the cores with a threaded server: its numpy's BLAS
    and OpenMP pools on one thread.  i-PI's own BLAS pool, spinning after each of its numpy operations, took the
    cores from the server's Numba threads: a 12^3 BaTiO3 NVT step with errors on 2 cores took 149 ms with i-PI's
    default pool and 101 ms with one thread (tools/bench_md.py --ipi-one-thread)."""
    env = dict(os.environ if base is None else base)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


__all__ = ["one_blas_thread", "matmul", "engine_environment"]
