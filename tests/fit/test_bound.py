"""Boundedness check and bounding terms."""
import numpy as np

from sp_server.fit.bound import BoundSettings, bound_model, check_bounded
from sp_server.model import AnharmonicPart, Model

FAST = BoundSettings(n_directions=60, md_steps=150)


def test_toy_model_is_bounded(toy):
    report = check_bounded(toy, FAST)
    assert report.bounded, report
    assert report.md_ok and report.n_failing_directions == 0


def test_unbounded_model_is_detected_and_bounded(toy):
    # keep only the quartic Ti-O term, with the wrong sign: the energy runs to -infinity
    anh = AnharmonicPart([toy.anharmonic.coefficients[0]], [-0.9])
    bad = Model(toy.reference, toy.harmonic, anh, name="unbounded")
    report = check_bounded(bad, FAST)
    assert not report.bounded and report.n_failing_directions > 0
    messages = []
    fixed, report = bound_model(bad, FAST, log=messages.append)
    assert report.bounded, messages
    assert len(fixed.anharmonic) > 1 and np.all(fixed.anharmonic.values[1:] > 0)
    assert fixed.metadata["bounding"]["terms"] == len(fixed.anharmonic) - 1
    assert any("NOT bounded" in m for m in messages)


def test_hot_md_moves_the_cell_and_catches_a_strain_runaway(toy):
    """A hole that only the cell can reach (-c (eta_1^3 + eta_2^3 + eta_3^3): nothing at fixed cell, the cell
    stretches without end under NPT) is invisible to a fixed-cell MD and caught by the NPT one."""
    from sp_server.fit.bound import hot_md
    from sp_server.model.symmetry import space_group_operations, symmetrize
    from sp_server.model.terms import StrainFactor, Term
    coef = symmetrize(Term(1.0, (), (StrainFactor(1, 3),)), space_group_operations(toy.reference), name="eta^3")
    c = 1.0 / coef.terms[0].weight    # the eta_1^3 term at -1e4 eV per cell: a barrier below kT
    bad = Model(toy.reference, toy.harmonic,
                AnharmonicPart(list(toy.anharmonic.coefficients) + [coef],
                               list(toy.anharmonic.values) + [-10000.0 * c]), name="strain runaway")
    settings = BoundSettings(md_steps=300, md_temperature=600.0, md_mesh=(2, 2, 2), md_cell=True)
    ok, msg, _ = hot_md(bad, BoundSettings(**{**settings.__dict__, "md_cell": False}))
    assert ok, msg
    ok, msg, escape = hot_md(bad, settings)
    assert not ok, msg              # left the trusted range ("max strain") or the cell fell apart in one step
    assert escape is not None and np.abs(escape.eta).max() > 0.02
    # samples on the way out, to label: whole frames of the MD, half-way and three quarters of the way
    assert len(escape.samples) == 2 and all(len(a) == 8 * toy.natoms for a in escape.samples)
    assert not np.allclose(escape.samples[0].cell.array, escape.samples[1].cell.array)
    # the toy model itself stays inside the trusted range with the cell moving
    ok, msg, _ = hot_md(toy, settings)
    assert ok and "NPT" in msg, msg



def test_relaxations_reach_the_strain_of_a_runaway_beyond_the_box(toy):
    """A strain hole with no barrier (eta^2 of the toy minus k (eta_1^3 + eta_2^3 + eta_3^3); along eta_1 -0.08 eV
    per cell at 5%, -2.3 eV at 12%): relaxations inside +-5% end above the floor (-0.25 eV per cell) and see nothing;
    with ``relax_max_strain`` 0.12 they fall below it and return floor rays at the strains where they did (the
    uniaxial runaways of the loop's NPT MDs, c/a 1.12 at 15 K)."""
    from sp_server.fit.bound import relaxation_probes
    from sp_server.fit.constrained import MeshPotentials
    from sp_server.model.symmetry import space_group_operations, symmetrize
    from sp_server.model.terms import StrainFactor, Term
    zero = np.zeros((1, 1, 1, toy.natoms, 3))

    def per_cell(model, s):
        energy = MeshPotentials(model).energy
        return energy((1, 1, 1), zero, np.array([s, 0, 0, 0, 0, 0.0])) - energy((1, 1, 1), zero, np.zeros(6))

    coef = symmetrize(Term(1.0, (), (StrainFactor(1, 3),)), space_group_operations(toy.reference), name="eta^3")
    k = 30 * per_cell(toy, 0.01) / 1e-4          # the barrier at 2 a2 / 3 k ~ 2% strain: kicks of 3% pass it
    bad = Model(toy.reference, toy.harmonic,
                AnharmonicPart(list(toy.anharmonic.coefficients) + [coef],
                               list(toy.anharmonic.values) + [-k / coef.terms[0].weight]), name="strain hole")
    assert -0.25 < per_cell(bad, 0.05) < 0 and per_cell(bad, 0.12) < -2
    assert relaxation_probes(bad, BoundSettings()) == []
    rays = relaxation_probes(bad, BoundSettings(relax_max_strain=0.12))
    assert rays and all(r.kind == "relaxed" and np.abs(r.eta).max() > 0.05 for r in rays)
    assert relaxation_probes(toy, BoundSettings(relax_max_strain=0.12)) == []
