"""The socket oracle: an i-PI protocol client (here `sp-server serve`, launched by the oracle) labels structures."""
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from sp_server.calculator import SecondPrinciplesCalculator
from sp_server.fit.harmonic import OracleError
from sp_server.model.native import load_model
from sp_server.oracles import make_oracle

MODEL = Path(__file__).resolve().parents[2] / "models" / "toy_perovskite.h5"


def structures(n):
    model = load_model(MODEL)
    rng = np.random.default_rng(3)
    out = []
    for _ in range(n):
        a = model.supercell((2, 2, 2))
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        a.set_cell(a.cell.array @ (np.eye(3) + rng.normal(scale=0.01, size=(3, 3))), scale_atoms=True)
        out.append(a)
    return model, out


def test_socket_oracle_equals_direct_evaluation():
    model, frames = structures(3)
    name = f"spso{uuid.uuid4().hex[:8]}"
    oracle = make_oracle("socket", {"unixsocket": name, "timeout": 60,
                                    "command": f"{sys.executable} -m sp_server.cli.main serve {MODEL} --address "
                                               f"{{unixsocket}} --unix --wait 60"})
    direct = SecondPrinciplesCalculator(model)
    try:
        for a in frames:
            b = a.copy()
            b.calc = oracle
            c = a.copy()
            c.calc = direct
            assert abs(b.get_potential_energy() - c.get_potential_energy()) < 1e-8
            assert np.abs(b.get_forces() - c.get_forces()).max() < 1e-8
            assert np.abs(b.get_stress() - c.get_stress()).max() < 1e-9
        small = model.supercell((1, 1, 1))
        small.calc = oracle
        with pytest.raises(OracleError, match="fixed order"):
            small.get_potential_energy()
    finally:
        oracle.close()


def test_socket_oracle_with_no_client_fails_with_a_clear_error():
    _, frames = structures(1)
    oracle = make_oracle("socket", {"unixsocket": f"spso{uuid.uuid4().hex[:8]}", "timeout": 2})
    a = frames[0]
    a.calc = oracle
    with pytest.raises(OracleError, match="socket oracle at /tmp/ipi_"):
        a.get_potential_energy()
    oracle.close()


def test_socket_oracle_options_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        make_oracle("socket", {})
    with pytest.raises(ValueError, match="107"):
        make_oracle("socket", {"unixsocket": "x" * 120})
