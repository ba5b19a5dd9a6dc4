"""Analytic forces and stress against central finite differences of the energy, part by part."""
import numpy as np
import pytest

from sp_server import SecondPrinciplesCalculator
from tests.conftest import displaced, random_model
from sp_server.model.toy import toy_perovskite

H = 1e-5


def fd_forces(atoms, indices):
    out = []
    for a, c in indices:
        p0 = atoms.positions.copy()
        e = []
        for s in (1, -1):
            p = p0.copy()
            p[a, c] += s * H
            atoms.positions = p
            e.append(atoms.get_potential_energy())
        atoms.positions = p0
        out.append(-(e[0] - e[1]) / (2 * H))
    return np.array(out)


def fd_stress(atoms):
    """sigma_ij = 1/V dE/d eps_ij for symmetric homogeneous deformations (ASE's sign), Voigt order."""
    c0, p0, vol = atoms.cell.array.copy(), atoms.positions.copy(), atoms.get_volume()
    out = []
    for i, j in ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)):
        e = []
        for s in (1, -1):
            eps = np.zeros((3, 3))
            eps[i, j] += s * H / 2
            eps[j, i] += s * H / 2
            d = np.eye(3) + eps
            atoms.set_cell(c0 @ d.T, scale_atoms=False)
            atoms.positions = p0 @ d.T
            e.append(atoms.get_potential_energy())
        out.append((e[0] - e[1]) / (2 * H) / vol)
    atoms.set_cell(c0, scale_atoms=False)
    atoms.positions = p0
    return np.array(out)


MODELS = {"toy": lambda: toy_perovskite(), "random": lambda: random_model(3)}


CASES = [(m, p) for m in sorted(MODELS) for p in ("short_range", "dipole_dipole", "elastic", "strain_phonon",
                                                   "anharmonic")
         if (m, p) != ("toy", "strain_phonon")]  # the cubic toy has no internal strain (symmetry)


@pytest.mark.parametrize("model_name,part", CASES)
@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 2, 3)])
def test_forces_and_stress_match_finite_differences(model_name, part, mesh):
    model = MODELS[model_name]()
    atoms = displaced(model, mesh, seed=len(part) + 7 * mesh[2])
    atoms.calc = SecondPrinciplesCalculator(model, parts=[part])
    forces = atoms.get_forces()
    stress = atoms.get_stress()
    rng = np.random.default_rng(0)
    idx = [(int(a), int(c)) for a, c in zip(rng.integers(len(atoms), size=8), rng.integers(3, size=8))]
    num_f = fd_forces(atoms, idx)
    ana_f = np.array([forces[a, c] for a, c in idx])
    fscale = np.abs(forces).max()
    sscale = np.abs(stress).max()
    if part in ("elastic",):
        assert fscale == 0.0
    else:
        assert fscale > 1e-4, "test configuration gives no forces for this part"
        assert np.abs(num_f - ana_f).max() < 1e-6 * fscale
    assert sscale > 1e-6
    assert np.abs(fd_stress(atoms) - stress).max() < 1e-6 * sscale


def test_total_model_large_strain_and_rotation():
    """All parts together, 3% strain plus a large rotation: stress from the polar-decomposition path."""
    model = random_model(5)
    atoms = displaced(model, (2, 1, 2), seed=11, strain=0.03)
    atoms.calc = SecondPrinciplesCalculator(model)
    stress = atoms.get_stress()
    assert np.abs(fd_stress(atoms) - stress).max() < 1e-6 * np.abs(stress).max()
    forces = atoms.get_forces()
    idx = [(0, 0), (3, 2), (7, 1), (11, 0)]
    assert np.abs(fd_forces(atoms, idx) - np.array([forces[a, c] for a, c in idx])).max() < 1e-6 * np.abs(forces).max()
