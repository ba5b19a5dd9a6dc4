"""A model re-expressed on a larger (non-diagonal) reference cell describes the same crystal."""
import numpy as np
from ase.build import make_supercell

from sp_server import SecondPrinciplesCalculator
from sp_server.model.supercell import expand_reference

S10 = np.array([[1, 1, 0], [-1, 1, 0], [0, 0, 1]])


def test_expanded_model_gives_the_same_energies(toy):
    big = expand_reference(toy, S10)
    assert big.natoms == 10 and len(big.anharmonic) == len(toy.anharmonic)
    rng = np.random.default_rng(2)
    atoms = big.supercell((2, 2, 1))
    atoms.positions += rng.normal(0, 0.08, atoms.positions.shape)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.01 * rng.normal(size=(3, 3))), scale_atoms=True)
    atoms.calc = SecondPrinciplesCalculator(big)
    e_big = atoms.get_potential_energy()
    # the same periodic structure as a 4x4x1 supercell of the original 5-atom cell (two copies of it)
    old = make_supercell(atoms, [[1, -1, 0], [1, 1, 0], [0, 0, 1]])
    old.calc = SecondPrinciplesCalculator(toy)
    assert abs(old.get_potential_energy() - 2 * e_big) < 1e-9 * abs(e_big)
    assert np.allclose(old.get_stress(), atoms.get_stress(), atol=1e-10)
    f_old = old.get_forces()
    n = len(atoms)  # make_supercell (cell-major): the first n atoms are the original ones, in order
    assert np.allclose(f_old[:n], atoms.get_forces(), atol=1e-9)
    assert np.allclose(f_old[n:], atoms.get_forces(), atol=1e-9)
