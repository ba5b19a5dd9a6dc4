"""sp_server.threads: BLAS on one thread during a frame, the errors' product split over threads, the engine's env."""
import numba
import numpy as np
from threadpoolctl import threadpool_info

from sp_server.threads import engine_environment, matmul, one_blas_thread


def _blas_threads():
    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]


def test_one_blas_thread_inside_and_restored_after_nested_blocks():
    before = _blas_threads()
    with one_blas_thread():
        assert all(n == 1 for n in _blas_threads())
        with one_blas_thread():
            assert all(n == 1 for n in _blas_threads())
        assert all(n == 1 for n in _blas_threads())
    assert _blas_threads() == before


def test_split_product_equals_the_plain_one():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(37, 53))
    b = rng.normal(size=(53, 9001))
    old = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        with one_blas_thread():
            split = matmul(a, b)
    finally:
        numba.set_num_threads(old)
    assert split.shape == (37, 9001)
    assert np.allclose(split, a @ b, rtol=1e-13, atol=1e-12)


def test_engine_environment_puts_the_engines_pools_on_one_thread():
    env = engine_environment({"PATH": "/bin", "OMP_NUM_THREADS": "8"})
    assert env["PATH"] == "/bin"
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"


def test_blocks_in_two_threads_keep_the_limit_until_the_last_leaves():
    """One server connection leaving its block must not lift the limit under another one still evaluating."""
    import threading
    before = _blas_threads()
    inside = threading.Event()
    release = threading.Event()
    seen = []

    def long_block():
        with one_blas_thread():
            inside.set()
            release.wait(10)
            seen.append(_blas_threads())

    t = threading.Thread(target=long_block)
    t.start()
    assert inside.wait(10)
    with one_blas_thread():
        pass                      # a short block opens and closes while the long one is open
    release.set()
    t.join(10)
    assert seen and all(n == 1 for n in seen[0])
    assert _blas_threads() == before
