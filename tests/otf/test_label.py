"""Labelling workers: checks on every label, failures with reasons, MPI ranks, claims of dead processes."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from sp_server.otf.label import LabelChecks, label_one, run_worker
from sp_server.store import Store

VENV_BIN = Path(sys.executable).parent


def frames(n, seed=0):
    out = []
    for i in range(n):
        a = bulk("Cu", cubic=True).repeat(2)
        a.rattle(0.05, seed=seed + i)
        out.append(a)
    return out


class Broken(Calculator):
    """EMT, except (by the number of atoms): NaN forces for 4 atoms, no stress for 8, an exception for 16."""
    implemented_properties = ["energy", "forces", "stress"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        kind = {4: 1, 8: 2, 16: 3}.get(len(atoms), 0)
        a = atoms.copy()
        a.calc = EMT()
        self.results = {"energy": a.get_potential_energy(), "forces": a.get_forces(), "stress": a.get_stress()}
        if kind == 1:
            self.results["forces"] = self.results["forces"] * np.nan
        elif kind == 2:
            del self.results["stress"]
        elif kind == 3:
            raise RuntimeError("SCF not converged (simulated)")


def test_label_one_refuses_bad_labels():
    a = frames(1)[0]
    e, f, s = label_one(a, EMT())
    assert np.isfinite(e) and f.shape == (32, 3) and s.shape == (6,)
    a2 = a.copy()
    a2.positions[1] = a2.positions[0] + 0.05  # atoms on top of each other: absurd forces
    with pytest.raises(ValueError, match="largest force"):
        label_one(a2, EMT(), LabelChecks(max_force=50.0))


def test_failed_labels_are_recorded_with_reasons_and_retried_up_to_the_limit(tmp_path):
    store = Store(tmp_path / "s.db", max_attempts=2)
    for rep in [(2, 2, 2), (1, 1, 1), (1, 1, 2), (1, 2, 2), (2, 2, 2)]:
        a = bulk("Cu", cubic=True).repeat(rep)
        a.rattle(0.05, seed=len(store.rows()))
        store.add(a)
    counts = run_worker(store, Broken(), log=lambda m: None)
    assert counts.labeled == 2 and counts.failed == 6  # three bad frames, two attempts each
    rows = {r.id: r for r in store.rows()}
    assert store.counts()["failed"] == 3 and store.counts()["labeled"] == 2
    reasons = sorted(r.last_error for r in rows.values() if r.state == "failed")
    assert any("non-finite" in x for x in reasons)
    assert any("no stress" in x for x in reasons)
    assert any("SCF not converged" in x for x in reasons)
    assert all(r.attempts == 2 for r in rows.values() if r.state == "failed")


def test_claims_of_a_dead_process_are_released_and_the_attempt_counts(tmp_path):
    store = Store(tmp_path / "s.db", max_attempts=2)
    for a in frames(3):
        store.add(a)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    import socket
    claimed = store.claim(f"{socket.gethostname()}:{pid}:label", n=2)
    store.claim(f"{socket.gethostname()}:{os.getpid()}:label", n=1)  # alive: kept
    assert len(claimed) == 2
    assert store.release_dead_claims() == 2
    rows = store.rows()
    assert sorted(r.state for r in rows) == ["claimed", "pending", "pending"]
    assert all(r.attempts == 1 and f":{pid}:label died during the call" in r.last_error
               for r in rows if r.state == "pending")
    # a structure that kills its worker at every attempt ends as failed, with the reason
    again = store.claim(f"{socket.gethostname()}:{pid}:label", n=2)
    assert len(again) == 2 and store.release_dead_claims() == 2
    assert sorted(r.state for r in store.rows()) == ["claimed", "failed", "failed"]


def test_frames_dying_together_are_not_blamed_but_a_persistent_killer_still_fails(tmp_path):
    """MPI ends a crashed rank's siblings: claims of two processes that died together give their attempts back
    (deaths counted instead), so a good frame in flight beside a crashing one is not failed for it; a frame that
    keeps dying still ends failed, after 2 x max_attempts deaths."""
    import socket
    store = Store(tmp_path / "s.db", max_attempts=2)
    for a in frames(2):
        store.add(a)

    def dead_pids(n):
        out = []
        for _ in range(n):
            p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
            out.append(int(p.stdout))
        return out

    host = socket.gethostname()
    for round_ in range(4):
        a, b = dead_pids(2)
        assert len(store.claim(f"{host}:{a}:rank0", n=1)) == 1 and len(store.claim(f"{host}:{b}:rank1", n=1)) == 1
        assert store.release_dead_claims() == 2
        rows = store.rows()
        if round_ < 3:
            assert all(r.state == "pending" and r.attempts == 0 and r.deaths == round_ + 1 for r in rows)
            assert all("(with others)" in r.last_error for r in rows)
    assert all(r.state == "failed" and r.deaths == 4 for r in store.rows())


def test_mpiexec_two_ranks_label_every_frame_once(tmp_path):
    mpiexec = VENV_BIN / "mpiexec"
    if not mpiexec.exists():
        mpiexec = shutil.which("mpiexec")
    assert mpiexec, "mpiexec missing: `make test` installs mpich + mpi4py"
    store = Store(tmp_path / "s.db", max_attempts=1)
    for a in frames(10):
        store.add(a)
    bad = frames(1, seed=99)[0]
    bad.positions[1] = bad.positions[0] + 0.05
    store.add(bad)
    out = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "sp_server.cli.main", "label",
                          str(tmp_path / "s.db"), "--oracle", "emt", "--no-progress", "--max-attempts", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr  # one failed label
    assert "10 frame(s) labelled, 1 failed" in out.stdout
    rows = store.rows()
    owners = {r.owner for r in rows if r.state == "labeled"}
    assert len(owners) == 2 and all(o.endswith(("rank0", "rank1")) for o in owners)
    assert store.counts()["labeled"] == 10 and store.counts()["failed"] == 1
    # each label equals a direct EMT evaluation (nothing mixed up between ranks)
    for r in rows:
        if r.state == "labeled":
            a = r.toatoms()
            ref = a.copy()
            ref.calc = EMT()
            assert abs(a.get_potential_energy() - ref.get_potential_energy()) < 1e-10
