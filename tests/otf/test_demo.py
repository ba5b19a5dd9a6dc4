"""The demonstrations and the shipped BaTiO3 model: configurations parse, the toy demo runs, the CHGNet stand-in
shows BaTiO3's polar instability, the shipped model has it too and carries its posterior."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sp_server.demo import OTF_DEMO_CONFIG
from sp_server.otf.config import OtfConfig

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "BaTiO3_chgnet"


def test_demo_and_shipped_configurations_parse(tmp_path):
    demo = tmp_path / "otf.toml"
    demo.write_text(OTF_DEMO_CONFIG)
    cfg = OtfConfig.load(demo)
    assert cfg.oracle == "chgnet" and cfg.loop.temperatures[0] == 15 and cfg.loop.temperatures[-1] == 300
    shipped = OtfConfig.load(SHIPPED / "otf.toml")
    assert shipped.run_dir == (SHIPPED / "run").resolve() and shipped.md.steps == 1000


def test_toy_demo_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sp_server.cli.main", "demo", "--toy", "-o", str(tmp_path),
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("toy_perovskite.h5", "ground_state.extxyz", "relax_evaluated.extxyz", "summary.json"):
        assert (tmp_path / name).exists(), name


@pytest.mark.parametrize("name", ["chgnet", "sevenn"])
def test_stand_in_oracles_have_the_polar_instability(name):
    pytest.importorskip(name)
    from sp_server.oracles import make_oracle
    from sp_server.otf.structures import cubic_perovskite
    calc = make_oracle(name)
    cubic = cubic_perovskite(4.036)
    cubic.calc = calc
    e0 = cubic.get_potential_energy()
    assert np.abs(cubic.get_forces()).max() < 1e-3
    polar = cubic_perovskite(4.036)
    polar.positions[1] += [0.05, 0.05, 0.05]      # Ti along 111
    polar.positions[2:] -= [0.02, 0.02, 0.02]
    polar.calc = calc
    assert polar.get_potential_energy() < e0


def test_shipped_model_is_polar_and_carries_its_posterior():
    from sp_server.calculator import SecondPrinciplesCalculator
    from sp_server.model.native import load_model
    from sp_server.otf.structures import polar_structure
    model = load_model(SHIPPED / "model.h5")
    assert model.posterior is not None and model.metadata["otf"]["n_train"] > 100
    assert model.metadata["ready"] and model.metadata["otf"]["bounded"]   # passed the boundedness check
    cubic = model.supercell((2, 2, 2))
    cubic.calc = SecondPrinciplesCalculator(model)
    polar = polar_structure(model, (2, 2, 2), "R", 0.08)
    polar.calc = SecondPrinciplesCalculator(model, errors=True)
    assert polar.get_potential_energy() < cubic.get_potential_energy()
    errors = polar.calc.results["bayesian_error"]
    assert errors["force_max"] > 0 and all(np.isfinite(v) for v in errors.values())
