"""Faults injected on purpose (issue 14): an oracle that raises, returns NaN forces, a 1e4 eV/A force, no stress,
hangs or kills its own process.  Each is one failed attempt with its reason; a flaky call succeeds on a retry; a
hang is killed by the per-call time limit with everything it launched; the harmonic part retries like the labels
and, started again, repeats no call that had succeeded."""
import os
import time

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from sp_server.calculator import SecondPrinciplesCalculator
from sp_server.fit.harmonic import HarmonicSettings, OracleError, harmonic_from_oracle
from sp_server.model.toy import toy_perovskite
from sp_server.oracles import isolated_oracle, make_oracle
from sp_server.oracles.faults import KINDS, structure_hash
from sp_server.otf.label import LabelChecks, run_worker
from sp_server.store import Store

REASONS = {"raise": "injected fault: the oracle failed", "nan": "non-finite energy or forces",
           "huge": "largest force 10000.0 eV/A", "nostress": "no stress", "hang": "no answer after 3 s",
           "crash": "the oracle process died while computing a label (signal 9)"}


def one_frame_per_kind():
    """Cu cells displaced so that each fault kind (structure hash modulo 7) is hit by exactly one frame."""
    out = {}
    k = 0
    while len(out) < len(KINDS):
        a = bulk("Cu", cubic=True)
        a.positions[0] += 0.003 * np.array([k % 7, k // 7, 1.0])
        kind = KINDS[structure_hash(a) % len(KINDS)]
        out.setdefault(kind, a)
        k += 1
    return out


def oracle_processes() -> set:
    """pids of isolated oracle processes (and anything they run: same process group) on this machine."""
    out = set()
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                with open(f"/proc/{proc}/cmdline", "rb") as fh:
                    if b"sp_server.oracles.isolated" in fh.read():
                        out.add(int(proc))
            except OSError:
                continue
    return out


@pytest.mark.timeout(180)
def test_every_fault_is_one_failed_attempt_with_its_reason(tmp_path):
    frames = one_frame_per_kind()
    before = oracle_processes()
    store = Store(tmp_path / "s.db", max_attempts=2)
    ids = {kind: store.add(a) for kind, a in frames.items()}
    calc = isolated_oracle("faulty", {"oracle": "emt", "faults": list(KINDS), "state_dir": str(tmp_path / "f"),
                                      "repeat": 1}, timeout_s=3.0)
    lines = []
    t0 = time.monotonic()
    counts = run_worker(store, calc, owner="w", checks=LabelChecks(max_force=50.0), log=lines.append)
    assert time.monotonic() - t0 < 120
    # every faulty frame failed once, with its reason, and was labelled at the second attempt; "none" at once
    assert counts.labeled == len(KINDS) and counts.failed == len(KINDS) - 1
    reasons = dict((fid, r) for fid, r in counts.reasons)
    for kind, fid in ids.items():
        row = store.rows(id=fid)[0]
        assert row.state == "labeled", (kind, row.get("last_error"))
        if kind == "none":
            assert row.attempts == 1 and fid not in reasons
        else:
            assert row.attempts == 2 and REASONS[kind] in reasons[fid], (kind, reasons[fid])
            assert REASONS[kind] in row.last_error
        ref = row.toatoms()
        e = ref.get_potential_energy()
        ref.calc = EMT()
        assert abs(e - ref.get_potential_energy()) < 1e-12            # the label is the wrapped oracle's
    # the hung call was killed with its whole process group; closing leaves no child behind
    calc.close()
    assert oracle_processes() - before == set()


@pytest.mark.timeout(60)
def test_a_frame_that_always_fails_ends_failed_and_the_others_go_on(tmp_path):
    frames = one_frame_per_kind()
    store = Store(tmp_path / "s.db", max_attempts=3)
    for a in frames.values():
        store.add(a)
    calc = make_oracle("faulty", {"oracle": "emt", "faults": ["raise", "none"], "state_dir": str(tmp_path / "f"),
                                  "persistent_every": 1})
    counts = run_worker(store, calc, owner="w", log=lambda m: None)
    c = store.counts()
    assert c["pending"] == 0 and c["claimed"] == 0 and c["labeled"] + c["failed"] == len(frames)
    assert c["failed"] >= 1 and counts.failed == 3 * c["failed"]
    for r in store.rows(state="failed"):
        assert r.attempts == 3 and "injected fault" in r.last_error


def _toy_flaky(tmp_path, **options):
    teacher = toy_perovskite(dipole=False, anharmonic=False)
    path = tmp_path / "teacher.h5"
    if not path.exists():
        from sp_server.model.native import save_model
        save_model(teacher, path)
    return teacher, make_oracle("faulty", dict({"oracle": "model", "path": str(path),
                                                "state_dir": str(tmp_path / "f")}, **options))


@pytest.mark.timeout(120)
def test_harmonic_part_retries_flaky_calls_and_resumes_from_its_cache(tmp_path):
    teacher, flaky = _toy_flaky(tmp_path, faults=["raise", "nan", "huge", "none"], repeat=1)
    settings = HarmonicSettings(supercell=(2, 2, 2))
    clean = harmonic_from_oracle(teacher.reference.to_atoms(), SecondPrinciplesCalculator(teacher), settings,
                                 log=None)
    lines = []
    model = harmonic_from_oracle(teacher.reference.to_atoms(), flaky, settings, log=lines.append,
                                 cache_dir=tmp_path / "cache")
    assert model.metadata["n_failed_oracle_calls"] > 0
    assert any("failed:" in ln and "retrying" in ln for ln in lines)
    np.testing.assert_allclose(model.harmonic.ifc, clean.harmonic.ifc, atol=1e-12)
    np.testing.assert_allclose(model.harmonic.elastic, clean.harmonic.elastic, atol=1e-12)
    assert model.metadata["n_oracle_calls"] == clean.metadata["n_oracle_calls"]
    # the same command again: every result comes from the cache, the oracle is not called
    calls = (tmp_path / "f" / "calls.log").read_text().count("\n")
    again = harmonic_from_oracle(teacher.reference.to_atoms(), flaky, settings, log=None,
                                 cache_dir=tmp_path / "cache")
    assert (tmp_path / "f" / "calls.log").read_text().count("\n") == calls
    np.testing.assert_array_equal(again.harmonic.ifc, model.harmonic.ifc)


@pytest.mark.timeout(120)
def test_harmonic_part_stops_on_a_call_that_keeps_failing_and_the_rerun_repeats_nothing(tmp_path):
    teacher, broken = _toy_flaky(tmp_path, faults=["none", "none", "none", "raise"], persistent_every=1)
    settings = HarmonicSettings(supercell=(2, 2, 2))
    with pytest.raises(OracleError, match=r"failed in step .* injected fault.*failed 3 time\(s\)"):
        harmonic_from_oracle(teacher.reference.to_atoms(), broken, settings, log=None, cache_dir=tmp_path / "c")
    log = (tmp_path / "f" / "calls.log").read_text().splitlines()
    done = {ln.split()[0] for ln in log if ln.split()[2] == "none"}
    # the oracle is repaired: the run goes on and computes only what had not been computed
    _, fixed = _toy_flaky(tmp_path, faults=["none"])
    harmonic_from_oracle(teacher.reference.to_atoms(), fixed, settings, log=None, cache_dir=tmp_path / "c")
    later = (tmp_path / "f" / "calls.log").read_text().splitlines()[len(log):]
    assert later and not done & {ln.split()[0] for ln in later}
