"""Bayesian regression against a teacher model with known coefficients and injected noise."""
import dataclasses

import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from sp_server import SecondPrinciplesCalculator
from sp_server.fit.bayes import SufficientStats, evidence_fit
from sp_server.fit.fit import QuantityScales, TrainingSet, fit_model
from sp_server.model import AnharmonicPart, Model
from sp_server.model.symmetry import space_group_operations, symmetrize
from sp_server.model.terms import DisplacementDiff as D
from sp_server.model.terms import StrainFactor as S
from sp_server.model.terms import Term
from sp_server.units import GPA_EV_A3
from tests.conftest import displaced

NOISE = 0.3  # in units of the quantity scales


def noisy_data(teacher, n, seed, scales=QuantityScales(), noise=NOISE):
    rng = np.random.default_rng(seed)
    calc = SecondPrinciplesCalculator(teacher)
    out = []
    for k in range(n):
        atoms = displaced(teacher, (2, 2, 2), seed=1000 * seed + k, amp=0.12, strain=0.015)
        atoms.calc = calc
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        e += rng.normal(0, noise * scales.energy_per_atom * len(atoms))
        f = f + rng.normal(0, noise * scales.force, f.shape)
        s = s + rng.normal(0, noise * scales.stress_gpa * GPA_EV_A3, 6)
        a = atoms.copy()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        out.append((f"teacher frame {k}", a))
    return out


@pytest.fixture(scope="module")
def teacher(toy):
    return toy


@pytest.fixture(scope="module")
def base(teacher):
    return Model(teacher.reference, teacher.harmonic, AnharmonicPart(), name="toy-harmonic")


def test_recovers_teacher_coefficients_and_noise(teacher, base):
    data = noisy_data(teacher, 25, seed=1)
    model, report = fit_model(data, base, teacher.anharmonic.coefficients, progress=False, log=lambda *a: None)
    w_true = teacher.anharmonic.values
    w = model.anharmonic.values
    std = np.sqrt(np.diag(model.posterior.covariance))
    z = np.abs(w - w_true) / std
    assert np.all(z < 4.5), (w, w_true, std)
    # and the data really determine them (the pure-strain eta^3 term needs larger strains than these frames have)
    disp = np.array([c.displacement_order > 0 for c in teacher.anharmonic.coefficients])
    assert np.all(std[disp] < 0.3 * np.abs(w_true[disp]))
    assert model.posterior.sigma_v == pytest.approx(NOISE, rel=0.1)
    assert report.n_structures == 25 and not report.skipped
    # training errors are at the injected noise level
    assert report.rmse["forces"] == pytest.approx(NOISE * 0.05, rel=0.2)


def test_incremental_statistics_equal_batch(teacher, base):
    data = noisy_data(teacher, 6, seed=2)
    ts1 = TrainingSet(base, teacher.anharmonic.coefficients)
    for label, a in data:
        ts1.add(a, label)
    ts2 = TrainingSet(base, teacher.anharmonic.coefficients)
    for label, a in data[:3]:
        ts2.add(a, label)
    st = ts2.combined()
    for label, a in data[3:]:
        ts2.add(a, label)
    assert np.allclose(ts1.combined().A, ts2.combined().A) and not np.allclose(st.A, ts2.combined().A)


def test_statistics_accumulated_in_place_equal_phi_transpose_phi():
    """The in-place (upper triangle, syrk) accumulation gives the full symmetric Phi^T Phi, also across reads
    between additions and for sizes around the block of the symmetrisation."""
    rng = np.random.default_rng(3)
    for ncoef in (1, 5, 513, 700):
        st, phis = SufficientStats(ncoef), []
        for rows in (40, 1, 6, 120):
            phi = rng.normal(size=(rows, ncoef))
            st.add(phi, rng.normal(size=rows))
            phis.append(phi)
            full = np.concatenate(phis)
            assert np.allclose(st.A, full.T @ full, rtol=1e-12, atol=1e-9)
        assert np.array_equal(st.A, st.A.T)
        again = SufficientStats.from_dict(st.as_dict())
        again.add(phis[0], np.zeros(len(phis[0])))
        assert np.allclose(again.A, st.A + phis[0].T @ phis[0])


def test_evidence_on_a_plain_linear_problem():
    """sigma_v and the weights of y = X w + noise from the evidence iterations (no physics involved)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 5))
    w = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    y = X @ w + rng.normal(0, 0.1, 2000)
    st = SufficientStats(5)
    st.add(X, y)
    fit = evidence_fit(st.A, st.b, st.yy, st.n_rows)
    assert fit.converged
    assert 1 / np.sqrt(fit.beta) == pytest.approx(0.1, rel=0.05)
    assert np.allclose(fit.mean, w, atol=0.01)


def test_selection_recovers_the_teacher_terms(teacher, base):
    ops = space_group_operations(teacher.reference)
    decoys = []
    for seed in (D(0, (0, 0, 0), 2, (0, 0, 0), 0, 4), D(2, (0, 0, 0), 3, (0, 0, 0), 2, 4),
                 D(0, (0, 0, 0), 4, (0, 0, 0), 1, 3)):
        decoys.append(symmetrize(Term(1.0, (seed,)), ops, "decoy"))
    decoys.append(symmetrize(Term(1.0, (D(2, (0, 0, 0), 3, (0, 0, 0), 0, 2),), (S(1, 1),)), ops, "decoy sp"))
    decoys = [d for d in decoys if d is not None]
    pool = decoys[:2] + list(teacher.anharmonic.coefficients) + decoys[2:]
    data = noisy_data(teacher, 20, seed=3, noise=0.1)
    n_true = len(teacher.anharmonic)
    model, report = fit_model(data, base, pool, select=n_true, progress=False, log=lambda *a: None)
    chosen = {c.name for c in model.anharmonic.coefficients}
    assert chosen == {c.name for c in teacher.anharmonic.coefficients}
    assert len(report.evidence_path) == n_true


def test_bad_structures_are_reported_and_the_rest_used(teacher, base):
    data = noisy_data(teacher, 8, seed=4)
    bad = data[1][1].copy()
    del bad[[0, 1, 2]]
    bad.calc = SinglePointCalculator(bad, energy=1.0, forces=np.zeros((len(bad), 3)), stress=np.zeros(6))
    nan = data[2][1].copy()
    nan.calc = SinglePointCalculator(nan, energy=data[2][1].get_potential_energy(), forces=data[2][1].get_forces(),
                                     stress=np.full(6, np.nan))
    nostress = data[3][1].copy()
    nostress.calc = SinglePointCalculator(nostress, energy=data[3][1].get_potential_energy(),
                                          forces=data[3][1].get_forces())
    items = [data[0], ("bad atoms", bad), ("nan stress", nan), ("no stress", nostress), data[4], data[4],
             ("unreadable", ValueError("cannot read")), *data[5:]]
    messages = []
    model, report = fit_model(items, base, teacher.anharmonic.coefficients, progress=False, log=messages.append)
    skipped = dict(report.skipped)
    assert set(skipped) == {"bad atoms", data[4][0], "unreadable"}
    assert "duplicate" in skipped[data[4][0]]
    assert any("nan stress: non-finite stress" in m for m in messages)
    assert any("no stress: no stress" in m for m in messages)
    assert report.n_structures == 7


def test_posterior_travels_with_the_model_and_eval_reports_errors(teacher, base, tmp_path):
    """Saved and loaded, the fitted model's posterior gives the same Bayesian errors; sp-server eval writes them."""
    import subprocess
    import sys

    import ase.io

    from sp_server.model import load_model, save_model
    data = noisy_data(teacher, 12, seed=5)
    model, _ = fit_model(data, base, teacher.anharmonic.coefficients, progress=False, log=lambda *a: None)
    path = save_model(model, tmp_path / "fit.h5")
    back = load_model(path)
    assert np.allclose(back.posterior.covariance, model.posterior.covariance)
    probe = displaced(teacher, (2, 2, 2), seed=77, amp=0.1)
    errs = []
    for m in (model, back):
        a = probe.copy()
        a.calc = SecondPrinciplesCalculator(m, errors=True)
        a.get_potential_energy()
        errs.append(a.calc.results["bayesian_error"])
    assert errs[0] == errs[1]
    assert errs[0]["force_max"] > 0 and errs[0]["energy_mev_per_cell"] > 0
    # farther from the data -> larger error
    far = displaced(teacher, (2, 2, 2), seed=78, amp=0.3)
    far.calc = SecondPrinciplesCalculator(model, errors=True)
    far.get_potential_energy()
    assert far.calc.results["bayesian_error"]["force_max"] > errs[0]["force_max"]
    ase.io.write(tmp_path / "probe.extxyz", [probe, far])
    proc = subprocess.run([sys.executable, "-m", "sp_server.cli.main", "eval", str(path), str(tmp_path / "probe.extxyz"),
                           "-o", str(tmp_path / "out.extxyz"), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = ase.io.read(tmp_path / "out.extxyz", ":")
    assert got[0].info["sp_err_force_max"] == pytest.approx(errs[0]["force_max"], rel=1e-6)  # extxyz rounding
    assert got[1].info["sp_err_energy_mev_per_cell"] > got[0].info["sp_err_energy_mev_per_cell"]


def test_threshold_configuration(teacher, base, tmp_path):
    import subprocess
    import sys

    import ase.io

    from sp_server.model import save_model
    from sp_server.model.posterior import ErrorThreshold
    assert ErrorThreshold.parse("0.2") == ErrorThreshold("force_max", 0.2)
    assert ErrorThreshold.parse("stress_max_gpa=0.5").quantity == "stress_max_gpa"
    with pytest.raises(ValueError, match="unknown error quantity"):
        ErrorThreshold.parse("forces=1")
    model, _ = fit_model(noisy_data(teacher, 10, seed=6), base, teacher.anharmonic.coefficients, progress=False,
                         log=lambda *a: None)
    path = save_model(model, tmp_path / "m.h5")
    near = displaced(teacher, (2, 2, 2), seed=90, amp=0.05)
    far = displaced(teacher, (2, 2, 2), seed=91, amp=0.4)
    ase.io.write(tmp_path / "in.extxyz", [near, far])
    a = far.copy()
    a.calc = SecondPrinciplesCalculator(model, errors=True)
    a.get_potential_energy()
    mid = 0.5 * a.calc.results["bayesian_error"]["force_max"]
    proc = subprocess.run([sys.executable, "-m", "sp_server.cli.main", "eval", str(path), str(tmp_path / "in.extxyz"),
                           "-o", str(tmp_path / "out.extxyz"), "--threshold", f"force_max={mid}", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "1 flagged" in proc.stdout
    assert [g.info["sp_flagged"] for g in ase.io.read(tmp_path / "out.extxyz", ":")] == [False, True]


def test_fixed_coefficients_come_out_of_the_targets_exactly(teacher, base):
    """A coefficient held at its true value leaves the others' fit as if its contribution had been subtracted from
    the data; held at 0 it is simply left out; held elsewhere it is in the model with zero variance."""
    from sp_server.fit.fit import fit_training_set
    data = noisy_data(teacher, 12, seed=4, noise=0.0)
    ts = TrainingSet(base, teacher.anharmonic.coefficients)
    for label, a in data:
        ts.add(a, label)
    w_true = teacher.anharmonic.values
    model, report = fit_training_set(ts, base, fixed={0: w_true[0]})
    assert model.anharmonic.values[-1] == w_true[0] and model.posterior.covariance[-1, -1] == 0.0
    assert np.allclose(model.anharmonic.values[:-1], w_true[1:], rtol=1e-4, atol=1e-6)
    assert report.rmse["forces"] < 1e-5 and report.selected == list(range(1, len(w_true)))
    out, report_out = fit_training_set(ts, base, fixed={0: 0.0})
    assert len(out.anharmonic) == len(w_true) - 1 and report_out.rmse["forces"] > 1e-3
    wrong, report_wrong = fit_training_set(ts, base, subset=[1, 2], fixed={0: 2 * w_true[0]})
    assert len(wrong.anharmonic) == 3 and report_wrong.rmse["forces"] > report.rmse["forces"]
    with pytest.raises(ValueError, match=r"fixed or unknown pool indices \[0\]"):
        fit_training_set(ts, base, subset=[0, 1], fixed={0: 1.0})


def test_bounded_by_construction_keeps_the_data(teacher, base):
    """A teacher whose only anharmonic term is a negative quartic is unbounded, and so is the plain fit of its
    data.  fit_bounded fits the term with the bounding terms and takes the posterior's most probable values under
    the probe rays' conditions: the result passes the check, its bounding values are non-negative (the pair walls
    (u_a - u_b)^8 at least BoundSettings.pair_wall), it keeps the
    posterior, and it fits the data better than the plain fit made bounded afterwards by bound_model's ladder."""
    from sp_server.fit.bound import BoundSettings, bound_model, bounding_coefficients, check_bounded, fit_bounded
    from sp_server.fit.fit import fit_training_set
    bad = Model(teacher.reference, teacher.harmonic, AnharmonicPart([teacher.anharmonic.coefficients[0]], [-0.9]),
                name="unbounded")
    data = noisy_data(bad, 10, seed=5, noise=0.0)
    bounding = bounding_coefficients(base)
    ts = TrainingSet(base, [bad.anharmonic.coefficients[0]] + bounding)
    for label, a in data:
        ts.add(a, label)
    idx = list(range(1, 1 + len(bounding)))
    fast = BoundSettings(n_directions=60, md_steps=150, md_temperature=600.0, pair_wall=1.0)  # loop: twice its top T
    plain, _ = fit_training_set(ts, base, fixed={j: 0.0 for j in idx})
    assert plain.anharmonic.values[0] == pytest.approx(-0.9, rel=1e-6)
    assert not check_bounded(plain, fast).bounded
    messages = []
    model, report, check = fit_bounded(ts, base, bounding=idx, settings=fast, log=messages.append)
    assert check.bounded and messages[-1].startswith("constrained fit, round") and "bounded (" in messages[-1], \
        messages
    meta = model.metadata["bounding"]
    assert meta["method"] == "constrained MAP" and meta["active"] >= 1 and meta["mahalanobis_shift"] > 0
    assert len(model.anharmonic) == 1 + len(bounding) and np.all(model.anharmonic.values[1:] >= 0)
    pairs = np.array([c.name.endswith(")^8") for c in bounding])
    assert pairs.sum() >= 2 and fast.pair_wall == 1.0 and np.all(model.anharmonic.values[1:][pairs] >= 1.0)  # walls
    assert model.posterior is not None and model.posterior.ncoef == len(model.anharmonic)
    added, _ = bound_model(plain, fast, log=lambda m: None)
    value = added.metadata["bounding"]["value"]
    no_refit = ts.rmse([0] + idx, np.concatenate([[-0.9], np.full(len(idx), value)]))
    assert report.rmse["forces"] < no_refit["forces"]


def _negative_quartic_data(teacher, base):
    """(training set, pool indices of the bounding terms): 10 noiseless frames of a teacher whose only anharmonic
    term is its quartic at -0.9 (unbounded), for a pool of that quartic and the bounding terms."""
    from sp_server.fit.bound import bounding_coefficients
    bad = Model(teacher.reference, teacher.harmonic, AnharmonicPart([teacher.anharmonic.coefficients[0]], [-0.9]),
                name="unbounded")
    bounding = bounding_coefficients(base)
    ts = TrainingSet(base, [bad.anharmonic.coefficients[0]] + bounding)
    for label, a in noisy_data(bad, 10, seed=5, noise=0.0):
        ts.add(a, label)
    return ts, list(range(1, 1 + len(bounding)))


def test_refit_starts_from_the_cuts_of_the_last_fit(teacher, base, tmp_path):
    """The rays a constrained fit's check found failing are its bound report's "cuts"; written and read back
    (probes.save_rays / load_rays: what the loop keeps in bound_cuts.npz) they are the same rays, and a refit given
    them starts with them as constraints and needs no more rounds than the first fit."""
    from sp_server.fit.bound import BoundSettings, fit_bounded
    from sp_server.fit.probes import load_rays, save_rays
    ts, idx = _negative_quartic_data(teacher, base)
    fast = BoundSettings(n_directions=60, md_steps=150, md_temperature=600.0)
    first_log, again_log = [], []
    _, _, first = fit_bounded(ts, base, bounding=idx, settings=fast, log=first_log.append)
    cuts = first.details["cuts"]
    assert first.bounded and len(first_log) > 1 and len(cuts) > 0, first_log   # the check found holes to cut
    save_rays(tmp_path / "cuts.npz", cuts)
    back = load_rays(tmp_path / "cuts.npz")
    assert len(back) == len(cuts)
    for a, b in zip(cuts, back):
        assert (a.kind, a.mesh, a.info, a.growth, a.floor) == (b.kind, b.mesh, b.info, b.growth, b.floor)
        for name in ("u", "eta", "amplitudes", "u0", "eta0"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or np.array_equal(np.asarray(x, float), np.asarray(y, float))
    _, _, again = fit_bounded(ts, base, bounding=idx, settings=fast, log=again_log.append, cuts=back)
    n_first = int(first_log[0].split(" constraints")[0].split(": ")[1])
    n_again = int(again_log[0].split(" constraints")[0].split(": ")[1])
    assert again.bounded and n_again > n_first and len(again_log) <= len(first_log), again_log
    with pytest.raises(ValueError, match="cuts.txt"):
        (tmp_path / "cuts.txt").write_text("not rays")
        load_rays(tmp_path / "cuts.txt")


def test_positive_by_form_finds_the_even_top_order(teacher):
    """The toy's pure displacement orders are 4 and 6: only its (Ti-O)^6 coefficient (even powers, positive weights)
    is the top order positive by form; a lower even order, a strain coupling or an odd form is not."""
    from sp_server.fit.bound import positive_by_form
    from sp_server.model.terms import Coefficient, Term
    coefs = list(teacher.anharmonic.coefficients)
    top = positive_by_form(coefs)
    assert [coefs[j].displacement_order for j in top] == [6] and coefs[top[0]].strain_order == 0
    d = coefs[top[0]].terms[0].displacements[0]
    other = dataclasses.replace(d, direction=(d.direction + 1) % 3, power=1)
    odd = Coefficient((Term(1.0, (dataclasses.replace(d, power=5), other)),), "odd sixth")
    negative = Coefficient((Term(-1.0, (d,)),), "negative weight")
    assert positive_by_form(coefs + [odd, negative]) == top
    assert positive_by_form([c for c in coefs if c.strain_order > 0]) == []


def test_top_order_positive_by_form_in_the_bounded_fit(teacher, base):
    """The data of a negative quartic teacher fitted with the quartic as the top order and
    BoundSettings.top_order_positive: the quartic is held at >= 0 (the fit says so), and the fit passes the check."""
    from sp_server.fit.bound import BoundSettings, fit_bounded
    ts, idx = _negative_quartic_data(teacher, base)
    settings = BoundSettings(n_directions=60, md_steps=150, md_temperature=600.0, top_order_positive=True)
    messages = []
    model, _, check = fit_bounded(ts, base, bounding=idx, settings=settings, log=messages.append)
    assert "top order positive by form: 1 coefficients kept >= 0" in messages
    assert check.bounded and model.anharmonic.values[0] >= -1e-9, messages


def test_a_frozen_prior_only_narrows_the_posterior_as_rows_are_added():
    """With alpha and beta held (optimise=False) the posterior covariance of a first batch minus that of the first
    two batches is positive semi-definite, and the widths are the given ones; optimised by the evidence on the
    same data, the prior width moves."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=12) * np.geomspace(1, 1e-3, 12)

    def batch(n):
        X = rng.normal(size=(n, 12))
        return X, X @ w + 0.05 * rng.normal(size=n)

    X1, y1 = batch(30)
    X2, y2 = batch(10)
    first = evidence_fit(X1.T @ X1, X1.T @ y1, y1 @ y1, len(y1))
    X, y = np.vstack([X1, X2]), np.concatenate([y1, y2])
    held = evidence_fit(X.T @ X, X.T @ y, y @ y, len(y), alpha=first.alpha, beta=first.beta, optimise=False)
    assert (held.alpha, held.beta, held.iterations) == (first.alpha, first.beta, 0)
    assert np.linalg.eigvalsh(first.covariance - held.covariance).min() > -1e-12
    probes = rng.normal(size=(200, 12))
    var = lambda c: np.einsum("ij,jk,ik->i", probes, c, probes)   # noqa: E731
    assert np.all(var(held.covariance) <= var(first.covariance) * (1 + 1e-12))
    moved = evidence_fit(X.T @ X, X.T @ y, y @ y, len(y))
    assert moved.alpha != first.alpha
