"""The on-the-fly loop end to end with a model file as the oracle (teacher-student, seconds): log, store, model
versions, report; and a run killed with SIGKILL at random moments that continues with nothing lost or doubled."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sp_server.model.native import load_model
from sp_server.otf.config import OtfConfig
from sp_server.otf.loop import OnTheFly
from sp_server.store import Store

TOY = Path(__file__).resolve().parents[2] / "models" / "toy_perovskite.h5"


def teacher(folder: Path) -> Path:
    """The toy perovskite without its Ti-Ba term (beyond the bond cutoff): a teacher the pool can represent."""
    from sp_server.model import AnharmonicPart, Model
    from sp_server.model.native import save_model
    toy = load_model(TOY)
    keep = [k for k, text in enumerate(toy.term_texts()) if "Ba" not in text]
    anh = AnharmonicPart([toy.anharmonic.coefficients[k] for k in keep], toy.anharmonic.values[keep])
    return save_model(Model(toy.reference, toy.harmonic, anh, name="teacher"), folder / "teacher.h5")


CONFIG = """
run_dir = "run"
[oracle]
name = "model"
path = "{teacher}"
[harmonic]
supercell = [1, 1, 1]
[terms]
orders = [4, 6]
sp_orders = [1, 2]
select = 12
[initial]
amplitudes = [0.05, 0.15, 0.3]
modes_per_q = 1
strains = [0.01, 0.02]
mixed = 6
polar_amplitudes = [0.1, 0.2, 0.3]
[md]
steps = 150
phases = ["R", "T"]
trajectory_stride = 10
timeout_s = 120
[loop]
temperatures = [30, 120]
threshold = "force_max=0.002"
max_labels_per_iteration = 3
max_iterations_per_temperature = 2
validation_per_md = 1
holdout_frames = 4
[fit]
bound_temperature = 300
"""


def write_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "otf.toml"
    path.write_text(CONFIG.format(teacher=teacher(folder)))
    return path


def fingerprints(store: Store) -> list:
    out = []
    for r in store.rows():
        a = r.toatoms()
        out.append((r.get("role"), np.round(a.positions, 5).tobytes(), np.round(a.cell.array, 5).tobytes()))
    return out


def processes_under(folder: Path) -> list:
    """pids of processes whose working directory is inside ``folder`` (i-PI runs in md/<key>/<phase>)."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(Path(os.readlink(proc / "cwd"))).startswith(str(folder)):
                out.append(int(proc.name))
        except OSError:
            continue
    return out


def check_run(run: Path):
    state = json.loads((run / "state.json").read_text())
    assert state["stage"] == "done"
    keys = [h["key"] for h in state["history"]]
    assert keys[0] == "initial" and len(keys) == len(set(keys))          # every iteration once
    # 2 temperatures x (1 or 2 iterations): the threshold is far below the errors, so the cap ends each temperature
    assert keys[1:] == ["T0030.0_it00", "T0030.0_it01", "T0120.0_it00", "T0120.0_it01"], keys
    versions = [h["model_version"] for h in state["history"]]
    assert versions == list(range(1, len(keys) + 1))
    assert sorted(p.name for p in (run / "models").iterdir()) == [f"model_v{v:03d}.h5" for v in versions]
    store = Store(run / "store.db")
    counts = store.counts()
    assert counts["pending"] == 0 and counts["claimed"] == 0 and counts["failed"] == 0
    fp = fingerprints(store)
    assert len(fp) == len(set(fp)), "a frame is in the store twice"
    # every MD iteration added its flagged frames (capped at 3) and one validation frame per phase
    for h in state["history"][1:]:
        assert 0 <= h["selected"] <= 3 and h["flagged"] >= h["selected"]
        assert h["rmse_validation"]["n"] > 0
    assert sum(h["selected"] for h in state["history"][1:]) >= 4
    ids = set(int(i) for i in np.load(run / "stats.npz")["extra.ids"])
    train = {r.id for r in store.rows(role="train")}
    validation = {r.id for r in store.rows(role="validation")}
    assert ids == train and not ids & validation                       # validation frames never trained on
    log = (run / "otf.log").read_text().splitlines()
    lines = [ln for ln in log if " it " in ln and "max err" in ln]
    assert len(lines) == 4 and all("val RMSE E" in ln and "labelled" not in ln.split("flagged")[0] for ln in lines)
    report = run / "report"
    for name in ("fig1_bayesian_error.png", "fig2_parity.png", "training_set_growth.png", "iterations.csv",
                 "summary.json", "summary.md"):
        assert (report / name).stat().st_size > 0, name
    # oracle calls: the harmonic part's + one per labelled frame, each counted once
    harmonic_calls = int(load_model(run / "harmonic.h5").metadata["n_oracle_calls"])
    assert harmonic_calls > 0 and state["oracle_calls"] == harmonic_calls + counts["labeled"]
    summary = json.loads((report / "summary.json").read_text())
    holdout = [r for r in store.rows(role="validation") if r.get("origin") == "holdout"]
    assert len(holdout) == 4 and all(r.get("temperature") == 120 for r in holdout)
    assert summary["held_out"]["final_set"] and summary["held_out"]["n_frames"] == 4
    assert summary["oracle_calls"] == state["oracle_calls"] > 0
    return state, store


def test_loop_end_to_end(tmp_path):
    cfg = OtfConfig.load(write_config(tmp_path))
    lines = []
    model_path = OnTheFly(cfg, progress=False, log=lines.append).run()
    assert model_path == tmp_path / "run" / "model.h5" and model_path.exists()
    state, store = check_run(tmp_path / "run")
    # run again: nothing to do, nothing added
    n = len(store.rows())
    OnTheFly(cfg, progress=False, log=lambda m: None).run()
    assert len(Store(tmp_path / "run" / "store.db").rows()) == n


@pytest.mark.slow
def test_killed_at_random_moments_continues_with_nothing_lost(tmp_path):
    config = write_config(tmp_path)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "sp_server.cli.main", "otf", str(config), "--no-progress"]
    rng = np.random.default_rng(11)
    kills = 0
    for attempt in range(12):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=float(rng.uniform(4.0, 12.0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)     # the loop and its i-PI children, without warning
            proc.wait()
            kills += 1
            time.sleep(0.2)
            continue
        assert proc.returncode == 0
        break
    else:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    assert kills >= 2
    time.sleep(1.0)
    assert not processes_under(run), "a killed loop left processes behind (i-PI waiting for its server)"
    state, _ = check_run(run)
    assert "resuming at stage" in (run / "otf.log").read_text()


def test_label_stage_with_mpi_workers_reads_the_oracle_table(tmp_path):
    """[label] workers = 2: the loop runs `mpiexec -n 2 ... sp-server label` with the [oracle] table of its
    configuration file; every pending frame is labelled once, by the teacher model."""
    from sp_server.calculator import SecondPrinciplesCalculator
    path = write_config(tmp_path)
    venv_mpiexec = Path(sys.executable).parent / "mpiexec"
    text = path.read_text().replace("[fit]", f"[label]\nworkers = 2\nmpiexec = \"{venv_mpiexec}\"\n[fit]")
    path.write_text(text)
    otf = OnTheFly(OtfConfig.load(path), progress=False, log=lambda m: None)
    teacher_model = load_model(tmp_path / "teacher.h5")
    rng = np.random.default_rng(5)
    frames = []
    for _ in range(6):
        a = teacher_model.supercell((1, 1, 1))
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        frames.append((a, {"role": "train", "origin": "test"}))
    otf.store.add_many(frames, run="test")
    otf.label_stage()
    rows = otf.store.rows(state="labeled")
    assert len(rows) == 6 and otf.store.counts()["pending"] == 0
    assert {r.owner.rsplit(":", 1)[-1] for r in rows} <= {"rank0", "rank1"}
    calc = SecondPrinciplesCalculator(teacher_model)
    for r in rows:
        a = r.toatoms()
        b = a.copy()
        b.calc = calc
        assert abs(a.get_potential_energy() - b.get_potential_energy()) < 1e-9
