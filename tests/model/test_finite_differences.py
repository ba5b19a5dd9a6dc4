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


def with_strain_ifc(model, seed=1, size=0.3):
    """The model plus strain-dependent force constants dPhi(R)/deta_v: random, symmetric (Phi(R) = Phi(-R)^T) and
    with the acoustic sum rule, on the model's own force-constant cells."""
    from sp_server.model.model import HarmonicPart, Model
    h = model.harmonic
    rng = np.random.default_rng(seed)
    cells = h.ifc_cells
    index = {tuple(c): k for k, c in enumerate(cells)}
    opp = [index[tuple(-c)] for c in cells]
    s = rng.normal(0, size, (6,) + h.ifc.shape) * (np.abs(h.ifc) > 0)
    s = 0.5 * (s + s[:, opp].transpose(0, 1, 4, 5, 2, 3))
    for v in range(6):   # the acoustic sum rule, keeping the symmetry (HarmonicPart.impose_asr)
        tmp = HarmonicPart(cells, s[v], h.elastic, h.internal_strain)
        tmp.impose_asr()
        assert len(tmp.ifc_cells) == len(cells)
        s[v] = tmp.ifc
    part = HarmonicPart(h.ifc_cells, h.ifc, h.elastic, h.internal_strain, h.born_charges, h.epsilon_inf,
                        strain_ifc_cells=cells, strain_ifc=s)
    return Model(model.reference, part, model.anharmonic, name=model.name + "+sIFC")


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 2, 3)])
def test_strain_dependent_force_constants_match_finite_differences(mesh):
    """E_sIFC = sum_v eta_v u.dPhi_v.u / 2 (MULTIBINIT's <correction_force_constant>): forces and stress against
    finite differences, alone (strain_phonon part of a model without internal strain) and with everything."""
    model = with_strain_ifc(toy_perovskite())
    for parts in (["strain_phonon"], None):
        atoms = displaced(model, mesh, seed=3, strain=0.02)
        atoms.calc = SecondPrinciplesCalculator(model, parts=parts)
        forces, stress = atoms.get_forces(), atoms.get_stress()
        fscale, sscale = np.abs(forces).max(), np.abs(stress).max()
        assert fscale > 1e-4 and sscale > 1e-6
        idx = [(0, 0), (3, 2), (7, 1), (len(atoms) - 1, 0)]
        assert np.abs(fd_forces(atoms, idx) - np.array([forces[a, c] for a, c in idx])).max() < 1e-6 * fscale
        assert np.abs(fd_stress(atoms) - stress).max() < 1e-6 * sscale
    # translation invariance (the blocks keep the sum rule)
    atoms = displaced(model, mesh, seed=3, strain=0.02)
    atoms.calc = SecondPrinciplesCalculator(model, parts=["strain_phonon"])
    e0, f0 = atoms.get_potential_energy(), atoms.get_forces()
    atoms.positions += [0.1, -0.2, 0.05]
    assert abs(atoms.get_potential_energy() - e0) < 1e-9 and np.abs(atoms.get_forces() - f0).max() < 1e-9
