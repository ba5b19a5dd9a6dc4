"""`sp-server serve` against real engines: ASE's SocketIOCalculator (an i-PI protocol server)."""
import os
import subprocess
import sys
import time
import uuid

import ase.db
import numpy as np
import pytest
from ase.calculators.socketio import SocketIOCalculator

from sp_server import SecondPrinciplesCalculator
from sp_server.model import save_model
from tests.conftest import displaced


def serve(model_path, name, *extra, log=None):
    cmd = [sys.executable, "-m", "sp_server.cli.main", "serve", str(model_path), "--address", name, "--unix",
           "--wait", "60", *map(str, extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def name():
    return f"spt{uuid.uuid4().hex[:8]}"


def test_socket_forces_equal_direct_evaluation(tmp_path, toy, name):
    path = save_model(toy, tmp_path / "toy.h5")
    proc = serve(path, name)
    try:
        direct = SecondPrinciplesCalculator(toy)
        with SocketIOCalculator(unixsocket=name) as calc:
            for seed in range(3):
                atoms = displaced(toy, (2, 2, 2), seed=seed, strain=0.01)
                ref = atoms.copy()
                ref.calc = direct
                atoms.calc = calc
                e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
                assert e == pytest.approx(ref.get_potential_energy(), rel=1e-12)
                assert np.allclose(f, ref.get_forces(), rtol=0, atol=1e-12 * np.abs(f).max())
                assert np.allclose(s, ref.get_stress(), rtol=0, atol=1e-12 * np.abs(s).max())
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "closed the connection after 3 frames" in out
