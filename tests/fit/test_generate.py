"""Generation of the pool of symmetry-adapted coefficients: invariance, uniqueness, known counts, toy terms."""
import io
import itertools

import numpy as np
import pytest

from sp_server.fit.generate import (
    GeneratorSettings,
    _canonical_disp,
    _compositions,
    _stars,
    count_by_order,
    generate_terms,
    print_counts,
)
from sp_server.model import Reference
from sp_server.model.symmetry import (
    canonical,
    is_invariant,
    space_group_operations,
    symmetrize,
)
from sp_server.model.terms import DisplacementDiff as D
from sp_server.model.terms import StrainFactor as S
from sp_server.model.terms import Term, term_text

# a pool small enough to be checked exhaustively, but with 2-body, strain-phonon and pure strain terms
MID = GeneratorSettings(cutoff=2.89, orders=(3, 4), strain_powers=(1,), sp_orders=(1, 2), pure_strain=(3, 4))


def tkey(t):
    return (tuple((d.atom_a, d.cell_a, d.atom_b, d.cell_b, d.direction, d.power) for d in t.displacements),
            tuple((s.voigt, s.power) for s in t.strains))


def keyset(coef):
    return frozenset(tkey(t) for t in coef.terms)


def by_name(coefs):
    return {c.name: c for c in coefs}


def perovskite_reference(frac_ti=0.5, abc=(4.0, 4.0, 4.0)):
    frac = np.array([(0, 0, 0), (0.5, 0.5, frac_ti), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)])
    cell = np.diag(abc)
    return Reference(cell, frac @ cell, [56, 22, 8, 8, 8], [137.3, 47.9, 16.0, 16.0, 16.0])


@pytest.fixture(scope="module")
def ref(toy):
    return toy.reference


@pytest.fixture(scope="module")
def ops(ref):
    return space_group_operations(ref)


@pytest.fixture(scope="module")
def pool(ref, ops):
    return generate_terms(ref, MID, ops=ops)


# --------------------------------------------------------------------------------------------------- invariance
@pytest.mark.parametrize("settings", [
    GeneratorSettings(cutoff=2.1, orders=(3, 4), strain_powers=(1,), sp_orders=(1, 2), pure_strain=(3,)),
    GeneratorSettings(cutoff=2.89, orders=(3, 4), max_bodies=1, strain_powers=(1,), sp_orders=(1, 2),
                      pure_strain=(3,)),
])
def test_every_generated_coefficient_is_invariant(ref, ops, settings):
    coefs = generate_terms(ref, settings, ops=ops)
    assert len(coefs) > 30
    assert all(is_invariant(c, ops) for c in coefs)


def test_each_coefficient_is_the_orbit_of_its_first_term(pool, ops):
    """Exactly what symmetry.symmetrize gives (same canonical terms, same weights) on a sample of the pool."""
    for c in pool[::7]:
        ref_coef = symmetrize(c.terms[0], ops)
        assert ref_coef is not None
        mine = {tkey(t): t.weight for t in c.terms}
        theirs = {tkey(t): t.weight for t in ref_coef.terms}
        assert mine.keys() == theirs.keys(), c.name
        assert all(abs(mine[k] - theirs[k]) < 1e-12 for k in mine), c.name
    assert all(is_invariant(c, ops) for c in pool[::60])


def test_terms_are_in_canonical_form(pool):
    for c in pool[::5]:
        for t in c.terms:
            ct = canonical(t)
            assert tkey(ct) == tkey(t) and ct.weight == t.weight


# ---------------------------------------------------------------------------------------- uniqueness, determinism
def test_no_duplicates_and_no_empty_coefficients(pool):
    assert len(pool) > 300
    keys = [keyset(c) for c in pool]
    assert len(set(keys)) == len(keys)
    all_terms = [tkey(t) for c in pool for t in c.terms]
    assert len(all_terms) == len(set(all_terms))  # orbits are disjoint: no monomial in two coefficients
    names = [c.name for c in pool]
    assert len(set(names)) == len(names)
    for c in pool:
        assert c.terms and c.terms[0].weight == 1.0
        assert all(abs(t.weight) > 1e-9 for t in c.terms)
        assert all(t.displacements or t.strains for t in c.terms)
        assert all(d.key()[:2] != d.key()[2:4] for t in c.terms for d in t.displacements)  # no zero difference
        assert {(t.displacement_order, t.strain_order) for t in c.terms} == {(c.displacement_order,
                                                                               c.strain_order)}


def test_names_are_the_text_of_the_first_term(pool, ref):
    assert all(c.name == term_text(c.terms[0], ref.labels) for c in pool)
    assert "(Ti_z-O1_z)^3" in by_name(pool)  # home-cell representative preferred for the name


def test_generation_is_deterministic(ref, ops, pool):
    again = generate_terms(ref, MID, ops=ops)
    assert [c.name for c in again] == [c.name for c in pool]
    assert all([(tkey(t), t.weight) for t in a.terms] == [(tkey(t), t.weight) for t in b.terms]
               for a, b in zip(again, pool))
    assert count_by_order(again) == count_by_order(pool)
    # without explicit ops: same result
    assert [c.name for c in generate_terms(ref, MID)] == [c.name for c in pool]


def test_ordering_and_counts(pool):
    orders = [(c.displacement_order, c.strain_order) for c in pool]
    assert orders == sorted(orders)
    counts = count_by_order(pool)
    assert sum(counts.values()) == len(pool)
    assert set(counts) == {(0, 3), (0, 4), (2, 1), (3, 0), (4, 0)}  # (1, 1) all vanish, see below
    out = io.StringIO()
    print_counts(pool, file=out)
    text = out.getvalue()
    assert "total" in text and str(len(pool)) in text


# ------------------------------------------------------------------------------------------------ known physics
@pytest.mark.parametrize("abc, counts", [
    ((4.0, 4.0, 4.0), {(0, 2): 3, (0, 3): 6, (0, 4): 11}),     # Oh: C11 C12 C44; 6 third-order; 11 fourth-order
    ((4.0, 4.0, 4.1), {(0, 2): 6, (0, 3): 12, (0, 4): 25}),    # D4h
    ((4.0, 4.05, 4.1), {(0, 2): 9, (0, 3): 20, (0, 4): 42}),   # D2h
])
def test_number_of_independent_elastic_constants(abc, counts):
    coefs = generate_terms(perovskite_reference(abc=abc),
                           GeneratorSettings(orders=(), strain_phonon=False, pure_strain=(2, 3, 4)))
    assert count_by_order(coefs) == counts


def test_cubic_third_order_strain_invariants(ref, ops):
    coefs = by_name(generate_terms(ref, GeneratorSettings(orders=(), strain_phonon=False, pure_strain=(3,)),
                                   ops=ops))
    assert sorted(coefs) == sorted(["(eta_1)^3", "(eta_1)^1(eta_2)^2", "(eta_1)^1(eta_2)^1(eta_3)^1",
                                    "(eta_1)^1(eta_4)^2", "(eta_1)^1(eta_5)^2", "(eta_4)^1(eta_5)^1(eta_6)^1"])
    assert keyset(coefs["(eta_1)^3"]) == {((), ((v, 3),)) for v in (1, 2, 3)}
    assert [t.weight for t in coefs["(eta_1)^3"].terms] == [1.0, 1.0, 1.0]
    assert len(coefs["(eta_1)^1(eta_2)^1(eta_3)^1"].terms) == 1
    assert len(coefs["(eta_4)^1(eta_5)^1(eta_6)^1"].terms) == 1
    assert len(coefs["(eta_1)^1(eta_2)^2"].terms) == 6


def test_linear_terms(ref, ops):
    """Every order-1 displacement orbit cancels in the centrosymmetric cubic cell (no force at the reference, even
    under strain); of the linear strains only the hydrostatic eta_1 + eta_2 + eta_3 is invariant (eta_4 is not)."""
    coefs = generate_terms(ref, GeneratorSettings(orders=(1, 2), sp_orders=(1,), strain_powers=(1, 2),
                                                  pure_strain=(1,)), ops=ops)
    counts = count_by_order(coefs)
    assert counts.get((1, 0), 0) == 0 and counts.get((1, 1), 0) == 0 and counts.get((1, 2), 0) == 0
    assert counts[(2, 0)] > 0
    (lin,) = [c for c in coefs if c.displacement_order == 0]
    assert keyset(lin) == {((), ((v, 1),)) for v in (1, 2, 3)}
    assert symmetrize(Term(1.0, (), (S(4, 1),)), ops) is None


def test_ti_o_single_bond_orbits(pool):
    coefs = by_name(pool)
    assert len(coefs["(Ti_z-O1_z)^4"].terms) == 6      # along the bond: 6 bonds
    assert len(coefs["(Ti_x-O1_x)^4"].terms) == 12     # across the bond: 6 bonds x 2 directions
    assert len(coefs["(Ti_z-O1_z)^3"].terms) == 6      # odd along the bond: allowed (the two O of a line differ)
    assert "(Ti_x-O1_x)^3" not in coefs                # odd across the bond: cancelled by the mirror
    assert {abs(t.weight) for t in coefs["(Ti_z-O1_z)^3"].terms} == {1.0}
    # two directions of one bond: forbidden alone, allowed with the matching shear strain
    assert "(Ti_x-O1_x)^1(Ti_y-O1_y)^1" not in coefs
    assert "(Ti_x-O1_x)^1(Ti_y-O1_y)^1(eta_6)^1" in coefs
    assert "(Ti_x-O1_x)^1(Ti_z-O1_z)^1(eta_5)^1" in coefs


def test_even_only_and_max_bodies(ref, ops, pool):
    even = generate_terms(ref, GeneratorSettings(cutoff=2.89, orders=(3, 4), strain_powers=(1,), sp_orders=(1, 2, 3),
                                                 pure_strain=(), even_only=True), ops=ops)
    assert {c.displacement_order for c in even} == {2, 4}
    one = generate_terms(ref, GeneratorSettings(**{**MID.__dict__, "max_bodies": 1}), ops=ops)
    assert all(len({d.key() for d in t.displacements}) <= 1 for c in one for t in c.terms)
    assert all(len({d.key() for d in t.displacements}) <= 2 for c in pool for t in c.terms)
    assert {keyset(c) for c in one} < {keyset(c) for c in pool}
    assert max(len({d.key() for d in c.terms[0].displacements}) for c in pool) == 2


def test_sp_pairs_add_exactly_those_strain_phonon_orders(ref, ops):
    """sp_pairs adds u^3 eta and u^4 eta to the u^n eta^q product without u^3 eta^2, u^4 eta^2: the same coefficients
    as those categories of the full product, nothing else."""
    base = dict(cutoff=2.89, orders=(3, 4), pure_strain=(3,), strain_powers=(1, 2), sp_orders=(2,))
    pairs = generate_terms(ref, GeneratorSettings(**base, sp_pairs=((3, 1), (4, 1))), ops=ops)
    full = generate_terms(ref, GeneratorSettings(**{**base, "sp_orders": (2, 3, 4)}), ops=ops)
    cat = lambda c: (c.displacement_order, c.strain_order)  # noqa: E731
    got = {cat(c) for c in pairs if c.strain_order and c.displacement_order}
    assert got == {(2, 1), (2, 2), (3, 1), (4, 1)}
    assert {keyset(c) for c in pairs} == {keyset(c) for c in full if cat(c) not in ((3, 2), (4, 2))}
    with pytest.raises(ValueError, match="sp_pairs"):
        generate_terms(ref, GeneratorSettings(**base, sp_pairs=((3,),)))


def test_invalid_settings(ref):
    with pytest.raises(ValueError, match="max_bodies"):
        generate_terms(ref, GeneratorSettings(max_bodies=0))
    with pytest.raises(ValueError, match="cutoff"):
        generate_terms(ref, GeneratorSettings(cutoff=-1.0))
    with pytest.raises(ValueError, match="orders"):
        generate_terms(ref, GeneratorSettings(orders=(0, 3)))


# --------------------------------------------------------------------------------------------------- toy model
def test_toy_coefficients_are_sums_of_generated_orbits(toy, ops):
    """Each hand-made coefficient of the toy model is a sum of whole generated coefficients (cutoff 3.5 so that the
    Ti-Ba bonds are in)."""
    coefs = generate_terms(toy.reference, GeneratorSettings(cutoff=3.5, orders=(4, 6), sp_orders=(2,),
                                                            strain_powers=(1,), pure_strain=(3,)), ops=ops)
    where = {tkey(t): (i, t.weight) for i, c in enumerate(coefs) for t in c.terms}
    for coef in toy.anharmonic.coefficients:
        vec: dict = {}
        for t in coef.terms:
            ct = canonical(t)
            vec[tkey(ct)] = vec.get(tkey(ct), 0.0) + ct.weight
        used: dict = {}
        for k, w in vec.items():
            assert k in where, (coef.name, k)
            i, gw = where[k]
            used.setdefault(i, w / gw)
        rebuilt: dict = {}
        for i, alpha in used.items():
            for t in coefs[i].terms:
                rebuilt[tkey(t)] = alpha * t.weight
        assert rebuilt.keys() == vec.keys()
        assert all(abs(rebuilt[k] - vec[k]) < 1e-12 for k in vec), coef.name
    names = by_name(coefs)
    assert "(Ba_x-Ti_x)^4" in names and "(Ti_x-O1_x)^2(Ti_y-O1_y)^2" in names and "(eta_1)^3" in names


# ------------------------------------------------------------------------------------- against brute force
def _brute_force(reference, ops, settings):
    """Symmetrize every star monomial (no symmetry reduction of the seeds) and collect the distinct orbits."""
    stars = _stars(reference, settings.cutoff)
    out = set()
    strain_monos = {q: list(itertools.combinations_with_replacement(range(1, 7), q)) for q in settings.strain_powers}
    for c in range(reference.natoms):
        variables = [(b, R, d) for b, R in stars[c] for d in range(3)]

        def monomials(n, c=c, variables=variables):
            for nb in range(1, min(settings.max_bodies, n) + 1):
                for ks in itertools.combinations(range(len(variables)), nb):
                    for pw in _compositions(n, nb):
                        yield tuple(D(c, (0, 0, 0), *variables[k], p) for k, p in zip(ks, pw))

        for n in settings.orders:
            for m in monomials(n):
                coef = symmetrize(Term(1.0, m), ops)
                if coef is not None:
                    out.add(keyset(coef))
        for n in (settings.sp_orders if settings.strain_phonon else ()):
            for m in monomials(n):
                for q in settings.strain_powers:
                    for sm in strain_monos[q]:
                        coef = symmetrize(Term(1.0, m, tuple(S(v, 1) for v in sm)), ops)
                        if coef is not None:
                            out.add(keyset(coef))
    return out


@pytest.mark.parametrize("frac_ti, abc, settings", [
    (0.5, (4.0, 4.0, 4.0), GeneratorSettings(cutoff=2.1, orders=(2, 3), strain_phonon=False, pure_strain=())),
    (0.52, (4.0, 4.0, 4.04), GeneratorSettings(cutoff=2.2, orders=(3,), sp_orders=(1, 2), strain_powers=(1,),
                                               pure_strain=())),  # P4mm: polar, 8 operations
])
def test_symmetry_reduced_seeds_find_every_orbit(frac_ti, abc, settings):
    reference = perovskite_reference(frac_ti, abc)
    ops = space_group_operations(reference)
    coefs = generate_terms(reference, settings, ops=ops)
    assert {keyset(c) for c in coefs} == _brute_force(reference, ops, settings)
    if frac_ti != 0.5:  # without inversion, order-1 strain-phonon terms survive
        assert count_by_order(coefs).get((1, 1), 0) > 0


def test_fast_canonical_form_is_the_one_of_symmetry_py():
    rng = np.random.default_rng(3)
    for _ in range(300):
        nd = int(rng.integers(1, 4))
        disps = tuple(D(int(rng.integers(5)), tuple(rng.integers(-1, 2, 3)), int(rng.integers(5)),
                        tuple(rng.integers(-1, 2, 3)), int(rng.integers(3)), int(rng.integers(1, 3)))
                      for _ in range(nd))
        disps = tuple(d for d in disps if d.key()[:2] != d.key()[2:4]) or (D(1, (0, 0, 0), 2, (0, 0, 1), 2, 1),)
        t = Term(1.0, disps)
        key, sign = _canonical_disp([(d.atom_a, d.cell_a, d.atom_b, d.cell_b, d.direction, d.power)
                                     for d in disps])
        ct = canonical(t)
        assert tkey(ct)[0] == key and ct.weight == sign
