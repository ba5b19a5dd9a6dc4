"""The shipped i-PI decks, run short with the real i-PI (PyPI ipi) against `sp-server serve`."""
import re
import shutil
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import ase.io
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
IPI = shutil.which("i-pi") or str(Path(sys.executable).parent / "i-pi")
MODEL = ROOT / "models" / "toy_perovskite.h5"


def run_deck(deck, tmp_path, steps, connections=1):
    if not Path(IPI).exists():
        pytest.fail("i-pi not found: `make test` installs it (pip install ipi)")
    work = tmp_path / deck
    shutil.copytree(ROOT / "ipi_inputs" / deck, work)
    name = f"spt{uuid.uuid4().hex[:8]}"
    text = (work / "input.xml").read_text()
    text = re.sub(r"<address>[^<]*</address>", f"<address>{name}</address>", text)
    text = re.sub(r"<total_steps>\d+</total_steps>", f"<total_steps>{steps}</total_steps>", text, count=1)
    text = re.sub(r"(<t_ramp>.*?<total_steps>)\d+", rf"\g<1>{steps}", text, flags=re.S)
    (work / "input.xml").write_text(text)
    return run_ipi(work, name, connections)


def run_ipi(work, name, connections=1, model=MODEL, serve_args=()):
    """i-PI on work/input.xml (socket address ``name``) against `sp-server serve` of ``model`` (default: the toy
    model) with ``serve_args``: the data of its properties file and the server's log."""
    text = (work / "input.xml").read_text()
    ipi = subprocess.Popen([IPI, "input.xml"], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        srv = subprocess.run([sys.executable, "-m", "sp_server.cli.main", "serve", str(model), "--address", name,
                              "--unix", "--connections", str(connections), "--wait", "60", *map(str, serve_args)],
                             capture_output=True, text=True, timeout=600)
        out, _ = ipi.communicate(timeout=120)
    finally:
        ipi.kill()
    assert srv.returncode == 0, srv.stdout + srv.stderr
    assert "I-PI reports success" in out, out[-3000:]
    prefix = re.search(r"<output prefix=['\"](\w+)['\"]>", text).group(1)
    return np.loadtxt(work / f"{prefix}.out"), srv.stderr


@pytest.mark.timeout(10)
def test_decks_print_energies_at_full_precision():
    """i-PI prints with %16.8e unless told otherwise: 9 digits of energies that carry the model's reference energy
    (-1.3e5 eV on 3x3x4 BaHfO3) leave 1e-3 eV quanta, as large as an NVE run's whole error (issue 14, item 6).
    Every shipped deck must print doubles that read back exactly."""
    decks = sorted((ROOT / "ipi_inputs").glob("*/input.xml"))
    assert decks
    for deck in decks:
        fmt = ET.parse(deck).getroot().get("floatformat", "%16.8e")  # i-PI's default
        for x in (-131572.65583636391, 2.0 / 3.0, -1.2345678901234567e-7):
            assert float(fmt % x) == x, f"{deck}: floatformat {fmt!r} prints {x!r} as {fmt % x}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("beads", [1, 3])
def test_generated_inputs_npt_and_path_integral_run_in_ipi(tmp_path, beads):
    """sp_server.otf.md.write_ipi_input: the loop's NPT and the path-integral NVT input run in the real i-PI."""
    from sp_server.model.native import load_model
    from sp_server.otf.md import MDJob, MDSettings, write_ipi_input
    name = f"spg{uuid.uuid4().hex[:8]}"
    atoms = load_model(MODEL).supercell((2, 2, 2))
    write_ipi_input(MDJob("g", atoms, tmp_path, 200.0, 20, 3, beads), name, MDSettings(trajectory_stride=5))
    data, log = run_ipi(tmp_path, name, connections=beads)
    assert data[-1, 0] == 20 and np.all(np.isfinite(data))
    assert log.count("connected to") == beads
    frames = ase.io.read(tmp_path / "md.pos_0.extxyz", ":")
    assert len(frames) in (4, 5) and len(frames[0]) == len(atoms)   # every 5th of 20 steps
    volume = data[:, 5]
    assert (np.ptp(volume) > 0) == (beads == 1)      # the flexible cell moves under NPT, PIMD is at fixed cell
    # production from the equilibrated state: continue_ipi_input on i-PI's RESTART, another socket, 10 more steps
    from sp_server.otf.md import continue_ipi_input
    name2 = f"spg{uuid.uuid4().hex[:8]}"
    continue_ipi_input(tmp_path / "RESTART", tmp_path / "more", name2, 10, stride=2)
    more, log2 = run_ipi(tmp_path / "more", name2, connections=beads)
    more = np.atleast_2d(more)
    assert more[0, 0] > 20 and more[-1, 0] == 30 and log2.count("connected to") == beads   # i-PI counts on
    last = ase.io.read(tmp_path / "md.pos_0.extxyz", -1)          # step 20
    first = ase.io.read(tmp_path / "more" / "md.pos_0.extxyz", 0)  # step 22: two steps on, not a fresh start
    step = np.abs(first.positions - last.positions).max()
    fresh = np.abs(atoms.positions - last.positions).max()
    assert step < 0.5 * fresh, (step, fresh)


def test_nvt(tmp_path):
    data, log = run_deck("nvt", tmp_path, 30)
    assert data[-1, 0] == 30 and np.all(np.isfinite(data))


def test_npt_flexible_cell_moves_the_cell(tmp_path):
    data, _ = run_deck("npt", tmp_path, 60)
    volume = data[:, 5]
    assert np.all(np.isfinite(data)) and np.ptp(volume) > 1e-3


def test_pimd_beads_in_parallel_connections(tmp_path):
    data, log = run_deck("pimd", tmp_path, 20, connections=4)
    assert data[-1, 0] == 20
    assert log.count("connected to") == 4


def test_temperature_ramp(tmp_path):
    data, _ = run_deck("ramp", tmp_path, 100)
    assert data[-1, 4] > data[0, 4] + 100  # the thermostat's target temperature went up


def test_nve_conserves_energy(tmp_path):
    data, _ = run_deck("nve", tmp_path, 400)
    t_ps, conserved = data[:, 1], data[:, 2]
    natoms = 40
    drift = np.polyfit(t_ps, conserved, 1)[0] / natoms  # eV per atom per ps
    fluct = np.std(conserved) / natoms
    print(f"NVE: drift {drift:.2e} eV/atom/ps, fluctuation {fluct:.2e} eV/atom over {t_ps[-1]:.3f} ps")
    assert abs(drift) < 1e-4 and fluct < 1e-4
