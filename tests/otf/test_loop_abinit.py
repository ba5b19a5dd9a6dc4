"""The loop with ABINIT as the oracle (LDA PseudoDojo, low cutoff): harmonic part, initial set, one full MD ->
flag -> label -> refit iteration on the 5-atom cell.  Minutes; marked slow (the README's test command runs it)."""
import json
import os
import shutil
from pathlib import Path

import pytest

from sp_server.otf.config import OtfConfig
from sp_server.otf.loop import OnTheFly
from sp_server.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500),
              pytest.mark.skipif(shutil.which("abinit") is None or not os.path.exists("/usr/bin/mpirun"),
                                 reason="needs ABINIT and Open MPI's mpirun (apt-get install abinit)")]

CONFIG = """
run_dir = "run"
[oracle]
name = "abinit"
xc = "LDA"
ecut_ha = 15.0
ecutsm_ha = 2.0
ngkpt = [2, 2, 2]
nstep = 40
tolvrs = 1e-8
ranks = 2
[system]
a = 3.95
[harmonic]
supercell = [1, 1, 1]
[terms]
orders = [3, 4]
select = 8
[initial]
amplitudes = [0.1]
modes_per_q = 2
strains = [0.01]
mixed = 2
polar_amplitudes = [0.15]
rattled = 3                 # (24 by default: each is an ABINIT call of the initial set)
[md]
supercell = [1, 1, 1]
phases = ["R"]
steps = 120
trajectory_stride = 10
timeout_s = 300
[loop]
temperatures = [100]
threshold = "force_max=0.0005"
max_labels_per_iteration = 2
max_iterations_per_temperature = 1
validation_per_md = 1
holdout_frames = 2
[fit]
bound_temperature = 300
"""


def test_loop_with_abinit(tmp_path):
    path = tmp_path / "otf.toml"
    path.write_text(CONFIG)
    lines = []
    model = OnTheFly(OtfConfig.load(path), progress=False, log=lines.append).run()
    run = Path(model).parent
    state = json.loads((run / "state.json").read_text())
    assert state["stage"] == "done"
    keys = [h["key"] for h in state["history"]]
    assert keys == ["initial", "T0100.0_it00"], keys
    md = state["history"][1]
    assert md["md_steps"] > 0 and md["flagged"] >= md["selected"]
    store = Store(run / "store.db")
    counts = store.counts()
    assert counts["pending"] == 0 and counts["claimed"] == 0
    md_labels = [r for r in store.rows(state="labeled") if r.get("origin") == "md"]
    # what the loop guarantees whatever path the MD takes: the selected flagged frames, and a validation frame when
    # the MD ran to the end, were labelled by ABINIT
    done = md["md_status"]["R"] == "done"
    assert 1 <= len(md_labels) <= md["selected"] + (1 if done else 0), (md, len(md_labels))
    assert all(len(r.toatoms()) == 5 and r.toatoms().get_stress().shape == (6,) for r in md_labels)
    assert state["history"][1]["rmse_validation"]["n"] >= 2   # initial-set validation frames (every 8th)
    assert (run / "report" / "fig2_parity.png").stat().st_size > 0
    assert any("labelled" in ln and "abinit" in ln for ln in lines)
