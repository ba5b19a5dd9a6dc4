"""`sp-server serve --committee-extras`: i-PI's own committee machinery (<ffcommittee> with parse_json) reads the
Bayesian energy error: its committee mean is our energy, its committee_uncertainty our error, and its
active-learning output holds exactly the frames above its threshold.  Real i-PI, the fitted toy model."""
import json
import re
import uuid

import numpy as np
import pytest

from sp_server.model.native import save_model
from sp_server.potential import Evaluator
from sp_server.server.driver import ServeSettings, committee_energies, read_trace
from sp_server.units import HARTREE_EV
from tests.server.test_ipi_decks import run_ipi

COMMITTEE_INPUT = """<simulation verbosity='low' floatformat='%24.16e'>
  <output prefix='c'>
    <properties stride='1' filename='out'> [ step, potential ] </properties>
    <trajectory filename='unc' stride='1' extra_type='committee_uncertainty'> extras </trajectory>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>7</seed></prng>
  <ffcommittee name='committee'>
    <ffsocket name='sp' mode='unix'><address>{address}</address></ffsocket>
    <parse_json>true</parse_json>
    <active_thresh>{thresh}</active_thresh>
    <active_output>al</active_output>
  </ffcommittee>
  <system>
    <initialize nbeads='1'>
      <file mode='ase'>init.extxyz</file>
      <velocities mode='thermal' units='kelvin'>300</velocities>
    </initialize>
    <forces><force forcefield='committee'/></forces>
    <ensemble><temperature units='kelvin'>300</temperature></ensemble>
    <motion mode='dynamics'>
      <dynamics mode='nvt'>
        <timestep units='femtosecond'>2.0</timestep>
        <thermostat mode='langevin'><tau units='femtosecond'>50</tau></thermostat>
      </dynamics>
    </motion>
  </system>
</simulation>
"""


def test_committee_energies_have_our_mean_and_our_error():
    pots = np.array(committee_energies(-1234.5, 7.0, 8))            # 7 meV per cell, 8 cells: sigma 0.056 eV
    assert pots.mean() * HARTREE_EV == pytest.approx(-1234.5, abs=1e-9)
    assert np.std(pots, ddof=1) * HARTREE_EV == pytest.approx(0.056, rel=1e-9)   # i-PI's estimator (ddof 1)


def test_committee_extras_need_a_posterior(tmp_path, toy):
    from sp_server.server.driver import ForceServer
    path = save_model(toy, tmp_path / "plain.h5")
    with pytest.raises(ValueError, match="no posterior"):
        ForceServer(path, "x", unix=True, settings=ServeSettings(committee_extras=True))


@pytest.mark.timeout(300)
def test_ipi_committee_reads_our_bayesian_energy_error(tmp_path, fitted_toy):
    import ase.io
    path = save_model(fitted_toy, tmp_path / "fit.h5")
    atoms = fitted_toy.supercell((2, 2, 2))
    rng = np.random.default_rng(3)
    atoms.positions += 0.03 * rng.normal(size=atoms.positions.shape)
    ase.io.write(tmp_path / "init.extxyz", atoms)
    ncell = len(atoms) // fitted_toy.natoms
    err0 = Evaluator(fitted_toy).evaluate(atoms.cell.array, atoms.positions, atoms.numbers,
                                          errors=True).errors["energy_mev_per_cell"]
    thresh = 1.02e-3 * err0 * ncell / HARTREE_EV     # just above the starting frame's error, in Hartree
    name = f"spc{uuid.uuid4().hex[:8]}"
    steps = 30
    (tmp_path / "input.xml").write_text(COMMITTEE_INPUT.format(steps=steps, address=name, thresh=repr(thresh)))
    props, _ = run_ipi(tmp_path, name, model=path,
                       serve_args=["--committee-extras", "--trace", tmp_path / "trace"])
    trace = read_trace(tmp_path / "trace" / "trace_0.csv")
    sigma = 1e-3 * trace["err_energy_mev_per_cell"] * ncell                 # our error of each frame, eV
    # i-PI's committee_uncertainty (Hartree), one value per printed step
    unc = np.array([float(x) for x in re.findall(r"^\s*([-+0-9.eE]+)\s*$", (tmp_path / "c.unc_0").read_text(), re.M)])
    assert len(unc) == len(props) == steps + 1 and len(trace) >= steps + 1
    # i-PI evaluates each printed step's frame once, in order: the trace's frames are those steps (the trace has 6
    # digits; E -/+ sigma/sqrt 2 in doubles keeps ~9 of sigma on these energies)
    np.testing.assert_allclose(unc * HARTREE_EV, sigma[:steps + 1], rtol=2e-5)
    # the committee's mean is our energy (compared in Hartree, as sent: i-PI's eV differs from ASE's by 1e-7)
    np.testing.assert_allclose(props[:, 1] * HARTREE_EV, trace["energy_ev"][:steps + 1], rtol=0, atol=1e-8)
    al = [json.loads("{" + chunk) for chunk in (tmp_path / "c.al").read_text().split("{")[1:]]
    above = unc > thresh
    assert 0 < above.sum() < len(unc)
    assert len(al) == above.sum()          # i-PI's active-learning output: exactly the frames above its threshold
    np.testing.assert_allclose(sorted(a["uncertainty"] for a in al), sorted(unc[above]), rtol=1e-12)
