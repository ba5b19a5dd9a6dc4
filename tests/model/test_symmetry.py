"""Space-group orbits of monomials: invariance, cancellation of forbidden terms, and physical invariance."""
import numpy as np
import pytest

from sp_server import SecondPrinciplesCalculator
from sp_server.model import AnharmonicPart, Model
from sp_server.model.symmetry import is_invariant, space_group_operations, symmetrize
from sp_server.model.terms import DisplacementDiff as D, StrainFactor as S, Term


@pytest.fixture(scope="module")
def ops(toy):
    return space_group_operations(toy.reference)


def test_pm3m_has_48_operations(ops):
    assert len(ops) == 48


def test_toy_coefficients_are_invariant(toy, ops):
    assert all(is_invariant(c, ops) for c in toy.anharmonic.coefficients)


def test_an_arbitrary_term_is_not_invariant(ops):
    from sp_server.model.terms import Coefficient
    lone = Coefficient((Term(1.0, (D(1, (0, 0, 0), 2, (0, 0, 0), 2, 4),)),))
    assert not is_invariant(lone, ops)


@pytest.mark.parametrize("term", [
    Term(1.0, (D(1, (0, 0, 0), 2, (0, 0, 0), 2, 1),)),                       # a force on Ti: forbidden
    Term(1.0, (D(1, (0, 0, 0), 2, (0, 0, 0), 0, 1), D(1, (0, 0, 0), 2, (0, 0, 0), 1, 1))),  # (Ti-O1)_x (Ti-O1)_y
    Term(1.0, (), (S(4, 1),)),                                                 # linear shear strain
])
def test_forbidden_monomials_vanish(term, ops):
    assert symmetrize(term, ops) is None


@pytest.mark.parametrize("term", [
    Term(1.0, (D(1, (0, 0, 0), 2, (0, 0, 0), 2, 4),)),
    Term(1.0, (D(1, (0, 0, 0), 2, (0, 0, 0), 2, 3),)),
    Term(1.0, (D(0, (0, 0, 0), 2, (0, 0, 0), 0, 2), D(1, (0, 0, 0), 3, (0, 0, 0), 1, 2)), (S(3, 1),)),
    Term(1.0, (D(2, (0, 0, 0), 3, (0, 0, 0), 0, 1), D(2, (0, 0, 0), 3, (0, 0, 0), 1, 1)), (S(6, 1),)),
])
def test_symmetrized_energy_is_invariant_under_the_group(term, ops, toy):
    """The orbit gives the same energy for a configuration and its image under every operation."""
    coef = symmetrize(term, ops)
    assert coef is not None and is_invariant(coef, ops)
    model = Model(toy.reference, toy.harmonic, AnharmonicPart([coef], [1.0]))
    calc = SecondPrinciplesCalculator(model, parts=["anharmonic"])
    rng = np.random.default_rng(0)
    atoms = model.supercell((2, 2, 2))
    atoms.positions += rng.normal(0, 0.1, atoms.positions.shape)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.02 * np.diag([1.0, -0.5, 0.7]) + 0.01 * np.ones((3, 3))),
                   scale_atoms=True)
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    assert abs(e0) > 1e-8
    for op in ops[::5]:
        rc = np.zeros((3, 3))
        for a in range(3):
            rc[op.perm[a], a] = op.sign[a]
        img = atoms.copy()  # apply the point operation to everything: cell and positions
        img.set_cell(atoms.cell.array @ rc.T, scale_atoms=False)
        img.positions = atoms.positions @ rc.T
        if np.linalg.det(rc) < 0:  # keep a right-handed cell by reversing one lattice vector (same lattice)
            img.set_cell(-img.cell.array, scale_atoms=False)
        img.calc = calc
        assert img.get_potential_energy() == pytest.approx(e0, rel=1e-10, abs=1e-12)


def test_lone_difference_of_a_site_with_its_own_image_vanishes(ops):
    """sum_L (u_Ti(L) - u_Ti(L + x)) is identically zero: no coefficient."""
    assert symmetrize(Term(1.0, (D(1, (0, 0, 0), 1, (1, 0, 0), 0, 1),)), ops) is None
