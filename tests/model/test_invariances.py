"""Symmetries every second-principles model must have, whatever its coefficients."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from sp_server import SecondPrinciplesCalculator
from sp_server.model.mapping import FrameMapper
from tests.conftest import displaced, random_model


def energy_forces_stress(model, atoms, parts=None):
    atoms = atoms.copy()
    atoms.calc = SecondPrinciplesCalculator(model, parts=parts)
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)


@pytest.mark.parametrize("which", ["toy", "random_no_dipole"])
def test_uniform_translation_changes_nothing(which, toy):
    model = toy if which == "toy" else random_model(2, dipole=False)
    atoms = displaced(model, (2, 2, 2), seed=3)
    e0, f0, s0 = energy_forces_stress(model, atoms)
    shifted = atoms.copy()
    shifted.positions += np.array([0.31, -0.17, 0.23])
    e1, f1, s1 = energy_forces_stress(model, shifted)
    assert abs(e1 - e0) < 1e-10 * max(1.0, abs(e0))
    assert np.abs(f1 - f0).max() < 1e-9 * np.abs(f0).max()
    assert np.abs(s1 - s0).max() < 1e-9 * np.abs(s0).max()


def test_dipole_part_has_acoustic_sum_rule(toy):
    """The dipole-dipole part alone: a rigid shift of a distorted structure costs nothing."""
    atoms = displaced(toy, (2, 2, 2), seed=4)
    e0, f0, _ = energy_forces_stress(toy, atoms, ["dipole_dipole"])
    shifted = atoms.copy()
    shifted.positions += [0.2, 0.1, -0.3]
    e1, f1, _ = energy_forces_stress(toy, shifted, ["dipole_dipole"])
    assert abs(e1 - e0) < 1e-10 * abs(e0)
    assert np.abs(f0.sum(axis=0)).max() < 1e-10 * np.abs(f0).max()


@pytest.mark.parametrize("which", ["toy", "random"])
def test_rigid_rotation(which, toy, rand_model):
    model = toy if which == "toy" else rand_model
    atoms = displaced(model, (2, 2, 1), seed=5, rotate=False)
    e0, f0, s0 = energy_forces_stress(model, atoms)
    rot = Rotation.from_rotvec([0.7, -1.1, 0.4]).as_matrix()
    turned = atoms.copy()
    turned.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
    turned.positions = atoms.positions @ rot.T
    e1, f1, s1 = energy_forces_stress(model, turned)
    assert abs(e1 - e0) < 1e-10 * max(1.0, abs(e0))
    assert np.allclose(f1, f0 @ rot.T, atol=1e-10 * np.abs(f0).max())
    assert np.allclose(s1, rot @ s0 @ rot.T, atol=1e-10 * np.abs(s0).max())


def test_ipi_upper_triangular_cell_orientation(rand_model):
    """i-PI stores lattice vectors as columns of an upper-triangular h: the same structure in that frame."""
    atoms = displaced(rand_model, (2, 1, 2), seed=6)
    e0, f0, _ = energy_forces_stress(rand_model, atoms)
    # rotate so that the lattice vectors form an upper-triangular column matrix (LAMMPS/i-PI convention)
    q, r = np.linalg.qr(atoms.cell.array.T)
    sign = np.sign(np.diag(r))
    q, r = q * sign, (r.T * sign).T
    h = r  # columns are lattice vectors, upper triangular
    assert np.allclose(np.tril(h, -1), 0)
    pos = atoms.positions @ q
    tri = atoms.copy()
    tri.set_cell(h.T, scale_atoms=False)
    tri.positions = pos
    e1, f1, _ = energy_forces_stress(rand_model, tri)
    assert abs(e1 - e0) < 1e-10 * abs(e0)
    assert np.allclose(f1, f0 @ q, atol=1e-10 * np.abs(f0).max())


@pytest.mark.parametrize("which", ["toy", "random"])
def test_tiling_scales_energy(which, toy, rand_model):
    """A 1x1x1 pattern tiled into 2x2x2 and 3x3x3 gives exactly 8x and 27x the energy (and the same stress)."""
    model = toy if which == "toy" else rand_model
    rng = np.random.default_rng(7)
    u = rng.normal(0, 0.07, (model.natoms, 3))
    eta = rng.normal(0, 0.01, 6)
    results = []
    for n in (1, 2, 3):
        cell, pos = FrameMapper.frame_from_model(model.reference, (n, n, n), np.tile(u, (n ** 3, 1)), eta)
        atoms = model.supercell((n, n, n))
        atoms.set_cell(cell, scale_atoms=False)
        atoms.positions = pos
        results.append(energy_forces_stress(model, atoms))
    e1 = results[0][0]
    assert abs(e1) > 1e-3
    assert results[1][0] == pytest.approx(8 * e1, rel=1e-11)
    assert results[2][0] == pytest.approx(27 * e1, rel=1e-11)
    for n, (_, f, s) in zip((2, 3), results[1:]):
        assert np.allclose(f, np.tile(results[0][1], (n ** 3, 1)), atol=1e-10)
        assert np.allclose(s, results[0][2], atol=1e-12)


def test_atom_order_is_matched_by_position(rand_model):
    atoms = displaced(rand_model, (2, 2, 1), seed=8)
    e0, f0, s0 = energy_forces_stress(rand_model, atoms)
    perm = np.random.default_rng(9).permutation(len(atoms))
    shuffled = atoms[perm]
    e1, f1, s1 = energy_forces_stress(rand_model, shuffled)
    assert abs(e1 - e0) < 1e-10 * abs(e0)
    assert np.allclose(f1, f0[perm], atol=1e-12)
    assert np.allclose(s1, s0, atol=1e-14)


def test_term_that_vanishes_on_a_small_supercell_is_refused(toy):
    """(u_Ti(0) - u_Ti(2,0,0)) is identically zero on a supercell with n1 = 2 (or 1): an error, not a silent 0."""
    from sp_server.model import AnharmonicPart, Coefficient, DisplacementDiff, Model, Term
    from sp_server.potential import SupercellPotential
    coef = Coefficient((Term(1.0, (DisplacementDiff(1, (0, 0, 0), 1, (2, 0, 0), 0, 2),)),), name="long Ti-Ti")
    model = Model(toy.reference, toy.harmonic, AnharmonicPart([coef], [1.0]))
    with pytest.raises(ValueError, match="'long Ti-Ti'.*identically zero on a 2x3x3 supercell"):
        SupercellPotential(model, (2, 3, 3))
    SupercellPotential(model, (3, 3, 3))  # fine: the two ends are different images
