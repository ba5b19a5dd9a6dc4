"""Structures of the loop: supercell phonons, frozen-phonon initial set, polar starting phases (toy perovskite)."""
import numpy as np
import pytest

from sp_server.model.mapping import matrix_from_voigt
from sp_server.model.toy import toy_perovskite
from sp_server.otf.structures import (
    initial_structures,
    polar_structure,
    supercell_modes,
)
from sp_server.potential import SupercellPotential


@pytest.fixture(scope="module")
def model():
    return toy_perovskite()


def test_supercell_modes_are_the_commensurate_phonons(model):
    mesh = (2, 2, 2)
    w2, patterns = supercell_modes(model, mesh)
    n = 8 * model.natoms
    assert w2.shape == (3 * n - 3,) and patterns.shape == (3 * n - 3, n, 3)
    assert np.all(np.diff(w2) >= -1e-9)
    # the toy's soft polar mode is unstable and its Gamma pattern is uniform over the cells
    assert w2[0] < 0
    # each pattern is an eigenvector: the harmonic energy along it is 1/2 w2 |sqrt(m) p|^2 (exactly quadratic)
    pot = SupercellPotential(model, mesh, parts=("short_range", "dipole_dipole"))
    masses = np.tile(model.reference.masses, 8)
    e0 = pot.evaluate(np.zeros(mesh + (model.natoms, 3)), np.zeros(6)).energy
    for k in (0, 5, 20):
        p = patterns[k] * 0.01
        e = pot.evaluate(p.reshape(mesh + (model.natoms, 3)), np.zeros(6)).energy - e0
        assert e == pytest.approx(0.5 * w2[k] * np.sum(masses[:, None] * p ** 2), rel=1e-6, abs=1e-12)
    # no pattern moves the centre of mass (translations removed)
    com = np.einsum("i,kij->kj", masses, patterns)
    assert np.abs(com).max() < 1e-8 * np.abs(patterns).max() * masses.sum()


def test_initial_structures_amplitudes_strains_and_mixtures(model):
    amps, strains = [0.05, 0.1], [0.01]
    frames = initial_structures(model, (2, 2, 2), amps, modes=3, strains=strains, mixed=4, seed=1,
                                polar_amplitudes=[0.1, 0.2])
    kinds = [meta["origin"] for _, meta in frames]
    assert kinds.count("phonon") == 6 and kinds.count("strain") == 12 and kinds.count("mixed") == 4
    assert kinds.count("polar") == 6
    ref = model.supercell((2, 2, 2))
    for atoms, meta in frames:
        if meta["origin"] == "phonon":
            d = atoms.positions - ref.positions
            assert np.abs(d).max() == pytest.approx(meta["amplitude"], rel=1e-9)
        if meta["origin"] == "strain":
            assert len(atoms) == model.natoms
            eta = np.zeros(6)
            eta[meta["voigt"]] = meta["strain"]
            cell = model.reference.cell @ (np.eye(3) + matrix_from_voigt(eta)).T
            assert np.allclose(atoms.cell.array, cell, atol=1e-12)
        if meta["origin"] == "mixed":
            assert np.abs(atoms.positions - ref.positions).max() > 0


@pytest.mark.parametrize("phase, direction", [("R", (1, 1, 1)), ("O", (1, 1, 0)), ("T", (0, 0, 1))])
def test_polar_structures_point_along_their_axis(model, phase, direction):
    atoms = polar_structure(model, (2, 2, 2), phase, 0.08)
    ref = model.supercell((2, 2, 2))
    d = atoms.positions - ref.positions
    b = [i for i, s in enumerate(ref.get_chemical_symbols()) if s == ref.get_chemical_symbols()[1]]
    ti = d[b]
    assert np.allclose(ti, ti[0]) and np.linalg.norm(d, axis=1).max() == pytest.approx(0.08)
    unit = np.array(direction, float) / np.linalg.norm(direction)
    assert np.allclose(ti[0] / np.linalg.norm(ti[0]), unit, atol=1e-9)
    # the polar distortion lowers the toy's energy (it has a double well)
    from sp_server.calculator import SecondPrinciplesCalculator
    atoms.calc = SecondPrinciplesCalculator(model)
    ref.calc = SecondPrinciplesCalculator(model)
    assert atoms.get_potential_energy() < ref.get_potential_energy()


def test_polar_strained_cells_keep_their_phase_symmetry(model):
    """The polar cells strained along their own axis: for T a tetragonal c/a (eta_zz only), for R equal shears and
    equal normal strains (the rhombohedral cell), and the volume strain; displacements those of the polar cell."""
    frames = initial_structures(model, (2, 2, 2), [0.05], modes=1, strains=[], mixed=0, polar_amplitudes=[],
                                polar_strains=[-0.01, 0.03], polar_strain_amplitudes=[0.1])
    strained = [(a, m) for a, m in frames if m["origin"] == "polar strain"]
    assert len(strained) == 3 * 1 * 2 * 2
    ref = model.supercell((1, 1, 1))
    for atoms, meta in strained:
        F = np.linalg.solve(ref.cell.array, atoms.cell.array).T             # cell = ref (1 + eps)^T
        eps = F - np.eye(3)
        assert np.allclose(eps, eps.T, atol=1e-12)
        s = meta["strain"]
        if meta["kind"] == "volume":
            assert np.allclose(eps, s / 3 * np.eye(3), atol=1e-12)
        elif meta["phase"] == "T":
            assert np.allclose(eps, np.diag([0, 0, s]), atol=1e-12)
        elif meta["phase"] == "R":
            assert np.allclose(eps, s / 3 * np.ones((3, 3)), atol=1e-12)
        else:                                                               # O: along 110
            assert np.allclose(eps, s / 2 * np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]]), atol=1e-12)
        # unstrained back, the displacements are the polar cell's
        u = atoms.positions @ np.linalg.inv(F).T - ref.positions
        polar = polar_structure(model, (1, 1, 1), meta["phase"], 0.1).positions - ref.positions
        assert np.allclose(u, polar, atol=1e-12)


def test_chain_patterns_of_the_metastable_phases_join_the_initial_set(model):
    from sp_server.otf.structures import PHASES, phase_structure
    frames = initial_structures(model, (2, 2, 2), [0.05], modes=1, strains=[], mixed=0,
                                chain_amplitudes=[0.1, 0.2])
    chains = [(a, m) for a, m in frames if m["origin"] == "chain"]
    assert sorted({m["phase"] for _, m in chains}) == sorted(PHASES) and len(chains) == 2 * len(PHASES)
    for atoms, meta in chains:
        want = phase_structure(model, meta["phase"], meta["amplitude"])
        assert len(atoms) == len(want) and np.allclose(atoms.positions, want.positions)
        ref = model.supercell(PHASES[meta["phase"]][0])
        if len(PHASES[meta["phase"]][1]) == 1:    # one wave vector: the largest displacement is the amplitude
            assert np.linalg.norm(atoms.positions - ref.positions, axis=1).max() == pytest.approx(meta["amplitude"])


def test_chain_backgrounds_are_the_metastable_patterns_tiled_on_2x2x2(model):
    """The boundedness check's relaxations start from them ([fit] bound_chains): each is its phase's own pattern
    repeated over the 2x2x2 cell; the uniform phases are left to the polar backgrounds."""
    from sp_server.otf.structures import PHASES, chain_backgrounds, phase_displacements, phase_structure
    backgrounds = chain_backgrounds(model, amplitudes=(0.1, 0.2))
    assert [name for name, _ in backgrounds] == [f"{p} chains {a:g} A" for p in ("P4/nmm", "Pmma", "Cmcm", "Pbcm")
                                                 for a in (0.1, 0.2)]
    for name, u in backgrounds:
        phase, amp = name.split(" chains ")[0], float(name.split()[-2])
        own = PHASES[phase][0]
        assert u.shape == (2, 2, 2, model.natoms, 3)
        cell = (phase_structure(model, phase, amp).positions - model.supercell(own).positions).reshape(
            tuple(own) + (model.natoms, 3))
        tiled = np.tile(cell, tuple(2 // n for n in own) + (1, 1))
        assert np.allclose(u, tiled, atol=1e-12) and np.abs(u).max() > 0
    with pytest.raises(ValueError, match="not a multiple"):
        phase_displacements(model, "Pbcm", 0.1, (1, 2, 2))
