"""Bounded by construction: the least-distance solver, the probe rays, the relaxation probes and the posterior the
constrained fit keeps."""
import numpy as np
import pytest

from sp_server.fit.bayes import SufficientStats, forward_selection
from sp_server.fit.bound import BoundSettings, relaxation_probes
from sp_server.fit.constrained import ConstraintSet, InfeasibleConstraints, constrained_map, least_distance
from sp_server.fit.probes import ProbeSettings, Ray, atom_ray_in, probe_rays
from sp_server.model import AnharmonicPart, Model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_least_distance_is_the_optimum_by_its_kkt_conditions(seed):
    """min |z|^2 subject to E z >= f is convex: z is the optimum if and only if it is feasible and z = E_A^T lam
    with lam >= 0 over the active rows A (Karush-Kuhn-Tucker).  A general solver (SLSQP) is no reference here: on
    seed 1 it stops with "positive directional derivative" on some machines."""
    rng = np.random.default_rng(seed)
    n, m = 6, 9
    E = rng.normal(size=(m, n))
    f = rng.normal(size=m) + 0.5
    z = least_distance(E, f)
    slack = E @ z - f
    assert np.all(slack >= -1e-8)
    active = slack < 1e-8 * max(1.0, np.abs(f).max())
    assert active.any() and np.linalg.norm(z) > 0          # f has positive entries: z = 0 is not feasible
    lam, *_ = np.linalg.lstsq(E[active].T, z, rcond=None)
    assert np.all(lam >= -1e-8) and np.allclose(E[active].T @ lam, z, atol=1e-8)
    # and no feasible point nearby is shorter
    for _ in range(200):
        y = z + 1e-3 * rng.normal(size=n)
        assert np.any(E @ y < f) or y @ y >= z @ z


def test_least_distance_far_away_and_infeasible():
    # a solution 1e7 away (a noise-free posterior is that tight) is found, not declared infeasible
    z = least_distance(np.array([[1e-7, 0.0]]), np.array([1.0]))
    assert z[0] == pytest.approx(1e7, rel=1e-6)
    with pytest.raises(InfeasibleConstraints):
        least_distance(np.array([[1.0], [-1.0]]), np.array([1.0, 1.0]))     # z >= 1 and z <= -1
    with pytest.raises(InfeasibleConstraints):
        least_distance(np.array([[0.0, 0.0]]), np.array([1.0]))             # 0 >= 1


def test_constrained_map_moves_least_in_the_posterior_metric():
    """Anisotropic posterior: the constraint w0 + w1 >= 2 is met by moving along the loose direction."""
    mean = np.zeros(2)
    cov = np.diag([1.0, 100.0])
    cs = ConstraintSet.empty(2)
    cs.add(np.array([1.0, 1.0]), 2.0, "test")
    w, info = constrained_map(mean, cov, cs)
    # minimise w0^2 + w1^2 / 100 on w0 + w1 = 2:  w = (2/101, 200/101)
    assert w == pytest.approx([2 / 101, 200 / 101], rel=1e-8)
    assert info["active"] == 1 and info["violation"] < 1e-12
    w2, _ = constrained_map(mean, cov, cs, scale=np.array([10.0, 0.1]))   # same answer in scaled coordinates
    assert w2 == pytest.approx(w, rel=1e-8)


def test_ray_conditions():
    ray = Ray("t", (1, 1, 1), np.zeros((1, 1, 1, 1, 3)), np.zeros(6), np.array([0.1, 0.2, 0.3]),
              growth=[(2, 0.01)], floor=[(1, -1.0)])
    assert ray.failures([0.0, 0.0, 0.02], 0.0) == []
    bad = ray.failures([0.0, -2.0, -2.0], 0.0)
    assert len(bad) == 2 and "falls" in bad[0] and "below" in bad[1]
    assert "non-finite" in ray.failures([0.0, np.nan, 1.0], 0.0)[0]


def test_probe_rays(toy):
    settings = ProbeSettings(n_directions=5, strain_directions=2, backgrounds=(("bg", np.full((2, 2, 2, 5, 3), 0.01)),),
                             background_strain_directions=2, background_directions=3)
    rays = probe_rays(toy.reference, settings)
    kinds = [r.kind for r in rays]
    assert kinds.count("random") == 5 and kinds.count("atom") == 5 * 26 and kinds.count("strain") == 2
    assert kinds.count("background strain") == 2 and kinds.count("background random") == 3
    atom = next(r for r in rays if r.kind == "atom")
    moved = [np.count_nonzero(np.linalg.norm(u.reshape(-1, 3), axis=1)) for _, u, _ in atom.configurations()]
    assert moved == [1] * len(atom.amplitudes)
    bg = next(r for r in rays if r.kind == "background strain")
    (_, u0, eta0), *_ = bg.configurations()
    assert np.allclose(u0, 0.01) and np.abs(eta0).max() == pytest.approx(0.02)
    # deterministic
    again = probe_rays(toy.reference, settings)
    assert all(np.array_equal(a.u, b.u) for a, b in zip(rays, again))
    # a lone atom moved on in a displaced background: only that atom differs between the configurations
    bgu = np.random.default_rng(0).normal(0, 0.05, (2, 2, 2, 5, 3))
    r = atom_ray_in((2, 2, 2), bgu, np.zeros(6), 7, [0, 0, 1])
    confs = [u.reshape(-1, 3) for _, u, _ in r.configurations()]
    diff = np.abs(confs[-1] - confs[0]).sum(axis=1)
    assert np.flatnonzero(diff).tolist() == [7] and np.allclose(np.delete(confs[0], 7, 0), np.delete(bgu.reshape(-1, 3), 7, 0))


def test_relaxation_probes_find_a_false_well(toy):
    """The toy model is bounded: every relaxation stays above the floor.  With its quartic Ti-O term negated the
    energy runs to -infinity, and the relaxations end below the floor (rays of kind 'relaxed')."""
    fast = BoundSettings(relax_kicks=1)
    assert relaxation_probes(toy, fast) == []
    bad = Model(toy.reference, toy.harmonic, AnharmonicPart([toy.anharmonic.coefficients[0]], [-0.9]))
    found = relaxation_probes(bad, fast)
    assert found and all(r.kind == "relaxed" for r in found)
    assert all(len(r.floor) == 1 and r.floor[0][1] >= 0.5 * 8 * fast.energy_floor for r in found)


def test_a_column_that_is_zero_up_to_rounding_is_never_selected():
    """A term whose orbit cancels in every cell of the data has a column of rounding noise (1e-20); scaled to unit
    size it used to be selected and fitted with a variance of 1e35."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3))
    X[:, 2] = 1e-20 * rng.normal(size=200)
    y = X[:, 0] - 0.5 * X[:, 1] + 0.01 * rng.normal(size=200)
    st = SufficientStats(3)
    st.add(X, y)
    assert st.feature_scale()[2] == 1.0
    selected, _ = forward_selection(st, 3)
    assert 2 not in selected
