"""The design rows of the Bayesian fit: phi @ w reproduces the anharmonic energy, forces and stress."""
import numpy as np
import pytest

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


def _with_random_posterior(model, seed=5):
    """``model`` with a random posterior covariance, one direction of zero variance (as the bounding terms have)."""
    import copy

    from sp_server.model.posterior import Posterior
    rng = np.random.default_rng(seed)
    nz = len(model.anharmonic)
    a = rng.normal(size=(nz, nz))
    cov = a @ a.T / nz
    v = rng.normal(size=nz)
    v /= np.linalg.norm(v)
    cov -= np.outer(cov @ v, cov @ v) / (v @ cov @ v)   # singular along cov^-1 v
    out = copy.copy(model)
    out.posterior = Posterior(cov, 0.1, 1.0, {"energy_per_atom": 1e-3, "force": 0.1, "stress_gpa": 0.1},
                              np.ones(nz), 0.0)
    return out


def _random_state(model, parallel, seed, mesh=(3, 2, 4)):
    """A potential on ``mesh`` (anharmonic part) with a random displacement field and strain, and its design rows."""
    rng = np.random.default_rng(seed)
    pot = SupercellPotential(model, mesh, parts=["anharmonic"], parallel=parallel)
    u = rng.normal(0, 0.1, mesh + (model.natoms, 3))
    eta = rng.normal(0, 0.02, 6)
    return pot, u, eta, pot.evaluate(u, eta, design=True)


@pytest.mark.parametrize("parallel", [False, True])
def test_error_rows_equal_the_design_rows(rand_model, parallel):
    """The one-sweep rows of the Bayesian errors (kernels.anharmonic.error_rows) are the design rows: tau,
    d tau / d eta and d tau / d u to rounding, and the virial rows are sum_i d tau / d u_i (x) u_i."""
    pot, u, eta, ref = _random_state(rand_model, parallel, 8)
    for _ in range(2):   # the second call reuses (and must clear) the rows buffer
        ev = pot.evaluate(u, eta, error_rows=True)
    nz = len(rand_model.anharmonic)
    rows = ref.grad_u_rows.reshape(nz, -1, 3)
    assert np.abs(ev.tau - ref.tau).max() <= 1e-12 * np.abs(ref.tau).max()
    assert np.abs(ev.grad_eta_rows - ref.grad_eta_rows).max() <= 1e-12 * np.abs(ref.grad_eta_rows).max()
    assert np.abs(ev.force_rows - rows).max() <= 1e-12 * np.abs(rows).max()
    virial = np.einsum("zia,ib->zab", rows, u.reshape(-1, 3))
    assert np.abs(ev.virial_rows - virial).max() <= 1e-12 * np.abs(virial).max()
    # and the energy and forces of the same call are the model's
    plain = pot.evaluate(u, eta)
    assert ev.energy == pytest.approx(plain.energy, rel=1e-14)
    assert np.array_equal(ev.grad_u, plain.grad_u)


def test_bayesian_errors_from_the_compact_rows_equal_the_design_row_errors(rand_model):
    """Evaluator(errors=True) takes the compact rows; on a strained, rotated, shuffled frame its errors equal those
    of the full design rows in the engine's frame (the path the fit uses) to rounding."""
    from sp_server.potential import Evaluator
    model = _with_random_posterior(rand_model)
    atoms = displaced(model, (2, 3, 2), seed=4, amp=0.1, strain=0.03, rotate=True)
    order = np.random.default_rng(2).permutation(len(atoms))
    atoms = atoms[order]
    ev = Evaluator(model)
    fast = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers, errors=True)
    full = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers, design=True, errors=True)
    assert not np.allclose(fast.frame.rotation, np.eye(3))
    assert fast.phi_forces is None   # no design rows were made
    for key, value in full.errors.items():
        assert value > 0
        assert fast.errors[key] == pytest.approx(value, rel=1e-10), key
    assert np.array_equal(fast.forces, full.forces) and fast.energy == full.energy


@pytest.mark.parametrize("parallel", [False, True])
def test_cell_energies_of_the_energy_pass(rand_model, parallel):
    """tau_cells (each cell's energy of each coefficient, from the energy pass) sums to the design rows' tau, and
    moves with the displacement field: rolling u by one cell along a rolls tau_cells the same way."""
    mesh = (3, 2, 4)
    pot, u, eta, ref = _random_state(rand_model, parallel, 9, mesh)
    ev = pot.evaluate(u, eta, tau_cells=True)
    tc = ev.tau_cells.copy()
    assert tc.shape == (6 * 4, len(rand_model.anharmonic))
    assert np.abs(tc.sum(axis=0) - ref.tau).max() <= 1e-12 * np.abs(ref.tau).max()
    assert ev.energy == pytest.approx(pot.evaluate(u, eta).energy, rel=1e-14)
    rolled = pot.evaluate(np.roll(u, 1, axis=0), eta, tau_cells=True).tau_cells
    expect = np.roll(tc.reshape(mesh + (-1,)), 1, axis=0).reshape(tc.shape)
    assert np.allclose(rolled, expect, rtol=1e-12, atol=1e-14)


def test_local_energy_error_finds_the_cell_of_a_lone_excursion(rand_model):
    """One atom pushed 0.4 A (along 111) out of a thermal frame: the largest per-cell energy error is in a cell next to it and
    is several times the thermal frame's largest; the total energy error equals the full path's."""
    from sp_server.potential import Evaluator
    model = _with_random_posterior(rand_model, seed=3)
    atoms = displaced(model, (4, 4, 4), seed=6, amp=0.03, strain=0.0, rotate=False)
    ev = Evaluator(model)
    quiet = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers, local_errors=True).errors
    assert set(quiet) == {"energy_mev_per_cell", "local_energy_max_mev"}
    site = 5 * model.natoms + 1                      # an atom of cell 5 of the 4x4x4 supercell
    atoms.positions[site] += 0.4 / np.sqrt(3.0)   # along 111: every direction of its bonds
    res = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers, errors=True)
    full = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers, design=True, errors=True).errors
    assert res.errors["energy_mev_per_cell"] == pytest.approx(full["energy_mev_per_cell"], rel=1e-10)
    assert res.errors["local_energy_max_mev"] > 3 * quiet["local_energy_max_mev"]
    pot = ev.potential((4, 4, 4))
    L = model.posterior._factor()
    per_cell = np.linalg.norm(pot._tau_cells @ L, axis=1)
    worst = np.unravel_index(int(np.argmax(per_cell)), (4, 4, 4))
    home = np.unravel_index(5, (4, 4, 4))
    assert max(min(abs(a - b), 4 - abs(a - b)) for a, b in zip(worst, home)) <= 1   # the cell or a neighbour


def test_calculator_gives_the_local_errors_alone_or_all(rand_model):
    model = _with_random_posterior(rand_model)
    atoms = displaced(model, (2, 2, 2), seed=2)
    atoms.calc = SecondPrinciplesCalculator(model, errors="local")
    atoms.get_forces()
    local = atoms.calc.results["bayesian_error"]
    assert set(local) == {"energy_mev_per_cell", "local_energy_max_mev"}
    atoms.calc = SecondPrinciplesCalculator(model, errors=True)
    atoms.get_forces()
    full = atoms.calc.results["bayesian_error"]
    assert set(full) == {"energy_mev_per_cell", "local_energy_max_mev", "force_max", "stress_max_gpa"}
    assert all(full[k] == pytest.approx(v, rel=1e-12) for k, v in local.items())
    with pytest.raises(ValueError, match="errors must be"):
        SecondPrinciplesCalculator(model, errors="forces")
