"""Engine frames that cannot be mapped onto the reference give clear errors; good ones are mapped consistently."""
import numpy as np
import pytest

from sp_server.model.mapping import FrameMapper, MappingError
from tests.conftest import displaced


def test_strain_and_displacements_are_recovered(toy):
    rng = np.random.default_rng(1)
    u = rng.normal(0, 0.1, (2 * 3 * 1 * 5, 3))
    eta = np.array([0.01, -0.02, 0.005, 0.012, -0.006, 0.004])
    cell, pos = FrameMapper.frame_from_model(toy.reference, (2, 3, 1), u, eta)
    frame = FrameMapper(toy.reference).map(cell, pos, toy.supercell((2, 3, 1)).numbers)
    assert frame.mesh == (2, 3, 1)
    assert np.allclose(frame.eta, eta, atol=1e-14)
    assert np.allclose(frame.u.reshape(-1, 3), u, atol=1e-13)
    assert np.allclose(frame.rotation, np.eye(3), atol=1e-14)


def test_wrong_atom_count(toy):
    atoms = toy.supercell((2, 2, 2))
    with pytest.raises(MappingError, match="suggest a 2x2x2 supercell \\(40 atoms\\) but the structure has 35"):
        FrameMapper(toy.reference).map(atoms.cell, atoms.positions[:35], atoms.numbers[:35])


def test_a_strongly_strained_cell_keeps_its_mesh(toy):
    """12 cells along z stretched by 4.5% look like 12.54 cells: the atom count settles it (12 x 12 x 12)."""
    rng = np.random.default_rng(2)
    mesh = (12, 12, 12)
    u = rng.normal(0, 0.05, (int(np.prod(mesh)) * 5, 3))
    eta = np.array([-0.01, -0.01, 0.045, 0.0, 0.0, 0.0])
    cell, pos = FrameMapper.frame_from_model(toy.reference, mesh, u, eta)
    mapper = FrameMapper(toy.reference)
    assert mapper.supercell_mesh(cell) == (12, 12, 13)          # the length ratios alone are fooled
    frame = mapper.map(cell, pos, toy.supercell(mesh).numbers)
    assert frame.mesh == mesh and np.allclose(frame.eta, eta, atol=1e-13)
    assert np.allclose(frame.u.reshape(-1, 3), u, atol=1e-12)


def test_wrong_species(toy):
    atoms = toy.supercell((1, 1, 1))
    with pytest.raises(MappingError, match="species"):
        FrameMapper(toy.reference).map(atoms.cell, atoms.positions, [56, 22, 8, 8, 9])


def test_two_atoms_on_one_site(toy):
    atoms = toy.supercell((1, 1, 2))
    pos = atoms.positions.copy()
    pos[2] = pos[7]  # two O1 on the same site
    with pytest.raises(MappingError, match="one-to-one"):
        FrameMapper(toy.reference).map(atoms.cell, pos, atoms.numbers)


def test_unmappable_cells(toy):
    atoms = toy.supercell((2, 2, 2))
    m = FrameMapper(toy.reference)
    with pytest.raises(MappingError, match="strain component 0.200 exceeds max_strain=0.1"):
        FrameMapper(toy.reference, max_strain=0.1).map(atoms.cell.array @ np.diag([1.0, 1.0, 1.2]),
                                                       atoms.positions, atoms.numbers)
    sheared = atoms.cell.array.copy()
    sheared[0] += sheared[1]  # a non-diagonal supercell of the reference
    with pytest.raises(MappingError):
        m.map(sheared, atoms.positions, atoms.numbers)
    with pytest.raises(MappingError, match="left-handed"):
        m.map(atoms.cell.array[[1, 0, 2]], atoms.positions, atoms.numbers)
    with pytest.raises(MappingError, match="finite"):
        pos = atoms.positions.copy()
        pos[3, 1] = np.nan
        m.map(atoms.cell, pos, atoms.numbers)


def test_matching_is_cached_and_follows_atoms_across_boundaries(toy):
    atoms = displaced(toy, (2, 2, 2), seed=3, strain=0.0, rotate=False)
    m = FrameMapper(toy.reference)
    first = m.map(atoms.cell, atoms.positions, atoms.numbers)
    wrapped = atoms.copy()
    wrapped.positions[0, 0] -= 0.05  # Ba at the origin leaves the cell ...
    wrapped.wrap()  # ... and comes back on the other side
    second = m.map(wrapped.cell, wrapped.positions, wrapped.numbers)
    assert np.array_equal(first.order, second.order)
    assert np.allclose(second.u.reshape(-1, 3)[0] - first.u.reshape(-1, 3)[0], [-0.05, 0, 0], atol=1e-12)
