"""The design rows of the Bayesian fit: phi @ w reproduces the anharmonic energy, forces and stress."""
import numpy as np

from sp_server import SecondPrinciplesCalculator
from sp_server.potential import SupercellPotential
from tests.conftest import displaced


def test_design_rows_reproduce_anharmonic_part(rand_model):
    model = rand_model
    atoms = displaced(model, (2, 1, 3), seed=21)
    atoms.calc = SecondPrinciplesCalculator(model, parts=["anharmonic"], design=True)
    e = atoms.get_potential_energy() - np.prod((2, 1, 3)) * model.reference.energy
    f = atoms.get_forces()
    s = atoms.get_stress()
    r = atoms.calc.results
    w = model.anharmonic.values
    nz, n = len(w), len(atoms)
    assert r["phi_energy"].shape == (nz,)
    assert r["phi_forces"].shape == (nz, n, 3)
    assert r["phi_stress"].shape == (nz, 6)
    assert abs(r["phi_energy"] @ w - e) < 1e-11 * abs(e)
    assert np.abs(np.einsum("z,zia->ia", w, r["phi_forces"]) - f).max() < 1e-11 * np.abs(f).max()
    assert np.abs(w @ r["phi_stress"] - s).max() < 1e-11 * np.abs(s).max()
    # the configuration is not trivial: the anharmonic part gives real energy, forces and stress
    assert abs(e) > 1e-6 and np.abs(f).max() > 1e-4 and np.abs(s).max() > 1e-6


def test_design_rows_are_per_coefficient(toy):
    """Row z equals the energy of a model whose only non-zero coefficient is z, at value 1."""
    rng = np.random.default_rng(3)
    pot = SupercellPotential(toy, (2, 2, 2), parts=["anharmonic"])
    u = rng.normal(0, 0.1, (2, 2, 2, 5, 3))
    eta = rng.normal(0, 0.01, 6)
    ev = pot.evaluate(u, eta, design=True)
    for z in range(len(toy.anharmonic)):
        one = np.zeros(len(toy.anharmonic))
        one[z] = 1.0
        pot.set_values(one)
        single = pot.evaluate(u, eta)
        assert abs(single.parts["anharmonic"] - ev.tau[z]) <= 1e-12 * max(1.0, abs(ev.tau[z]))
        assert np.allclose(single.grad_u, ev.grad_u_rows[z], atol=1e-12)
        assert np.allclose(single.grad_eta, ev.grad_eta_rows[z], atol=1e-12)
