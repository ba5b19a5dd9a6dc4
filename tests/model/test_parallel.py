"""Threaded and serial kernels give the same numbers (the threaded path is the default on large supercells)."""
import numpy as np

from sp_server.potential import SupercellPotential


def test_parallel_equals_serial(rand_model):
    rng = np.random.default_rng(4)
    mesh = (4, 3, 5)
    u = rng.normal(0, 0.08, mesh + (rand_model.natoms, 3))
    eta = rng.normal(0, 0.01, 6)
    out = [SupercellPotential(rand_model, mesh, parallel=p).evaluate(u, eta, design=True) for p in (False, True)]
    s, p = out
    assert abs(s.energy - p.energy) < 1e-12 * abs(s.energy)
    for a, b in ((s.grad_u, p.grad_u), (s.grad_eta, p.grad_eta), (s.tau, p.tau), (s.grad_u_rows, p.grad_u_rows),
                 (s.grad_eta_rows, p.grad_eta_rows)):
        assert np.abs(a - b).max() <= 1e-12 * np.abs(a).max()
