"""The quick-start demonstrations.

``run_otf_demo``: the main job. Builds a BaTiO3 second-principles model on the fly with the CHGNet stand-in oracle
(harmonic part and phonon-derived training set from the oracle, then NPT MD through i-PI with the model served,
Bayesian flagging, labelling, refits from 15 K to 300 K), with settings lighter than the shipped model's
(models/BaTiO3_chgnet/otf.toml) so that it finishes in minutes on two cores.  Writes the configuration it ran
into the output folder (edit it and run ``sp-server otf DIR/otf.toml`` to continue or redo).

``run_demo``: the toy perovskite: build, relax its ground state, evaluate a trajectory, plot the double well
(seconds, no oracle needed).
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS

from .batch import evaluate_file
from .calculator import SecondPrinciplesCalculator
from .model.mapping import FrameMapper
from .model.native import load_model, save_model
from .model.toy import toy_perovskite


def _polar_path(model, pattern, amplitudes):
    """Energy per cell (eV) of the cubic 1x1x1 cell displaced by amplitude * pattern (nat, 3), Angstrom."""
    atoms = model.supercell((1, 1, 1))
    atoms.calc = SecondPrinciplesCalculator(model)
    base = atoms.positions.copy()
    out = []
    for amp in amplitudes:
        atoms.positions = base + amp * pattern
        out.append(atoms.get_potential_energy())
    return np.array(out)


OTF_DEMO_CONFIG = """\
# BaTiO3 on the fly with the CHGNet stand-in oracle: the demo's lighter settings (docs/otf.md).
# The shipped model's settings: models/BaTiO3_chgnet/otf.toml.   Continue or redo:  sp-server otf otf.toml
run_dir = "run"

[oracle]
name = "chgnet"

[system]
structure = "BaTiO3"
a = 4.0

[terms]
sp_pairs = [[3, 1], [4, 1]]     # u^3 eta, u^4 eta: the couplings behind the polar phases' 2-5% strain
select = 150

[initial]
polar_strains = [-0.01, 0.02, 0.04, 0.07]  # polar cells on the strain wall (the oracle's c/a valley ends at 1.07)
chain_amplitudes = [0.1, 0.2]   # A: the polar-chain patterns of the seven metastable phases

[fit]
energy_scale = 3e-4             # eV/atom: one energy row of a 40-atom frame weighs against its 120 force rows
bound_relax_strain = 0.12       # the boundedness check relaxes up to 12% strain, where strain runaways go

[loop]
temperatures = [15, 150, 300]
threshold = "force_max=0.3"     # eV/A of real error: the Bayesian one times its measured real/Bayesian ratio
threshold_mode = "calibrated"
max_labels_per_iteration = 40
max_iterations_per_temperature = 1
validation_per_md = 1
holdout_frames = 20

[md]
supercell = [2, 2, 2]
phases = ["R", "O", "T"]
steps = 500
"""


def run_otf_demo(outdir="demo_output", *, progress=True, log=print) -> Path:
    """Run (or continue) the BaTiO3 on-the-fly demo in ``outdir``; returns the final model's path."""
    from .otf.config import OtfConfig
    from .otf.loop import OnTheFly
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    config = outdir / "otf.toml"
    if not config.exists():
        config.write_text(OTF_DEMO_CONFIG)
    log(f"on-the-fly demo: configuration {config.resolve()} (run folder {(outdir / 'run').resolve()})")
    return OnTheFly(OtfConfig.load(config), progress=progress, log=log).run()


def run_demo(outdir="demo_output", *, mesh=(2, 2, 2), progress=True, log=print) -> dict:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    model_path = save_model(toy_perovskite(), outdir / "toy_perovskite.h5")
    model = load_model(model_path)
    log(model.summary())

    # relax a randomly perturbed supercell (cell + positions) into its ground state
    rng = np.random.default_rng(0)
    atoms = model.supercell(mesh)
    atoms.positions += rng.normal(0, 0.03, atoms.positions.shape)
    atoms.positions[1::5] += 0.08  # push every Ti along [111]
    atoms.calc = SecondPrinciplesCalculator(model)
    e_start = atoms.get_potential_energy()
    t0 = time.perf_counter()
    opt = BFGS(FrechetCellFilter(atoms), logfile=str(outdir / "relax.log"), trajectory=str(outdir / "relax.traj"))
    with warnings.catch_warnings():  # scipy's logm inside the cell filter warns about 1e-13 round-off
        warnings.filterwarnings("ignore", message="logm result may be inaccurate")
        opt.run(fmax=1e-4, steps=2000)
    ncell = int(np.prod(mesh))
    e_min = atoms.get_potential_energy() / ncell
    cellpar = atoms.cell.cellpar()
    frame = FrameMapper(model.reference).map(atoms.cell.array, atoms.positions, atoms.numbers)
    pattern = frame.u.reshape(-1, model.natoms, 3).mean(axis=0)
    pattern -= pattern[0]  # relative to the A site
    born = model.harmonic.born_charges
    pol = None
    if born is not None:  # P = e / V sum_i Z_i u_i, in C/m^2 (1 e/A^2 = 16.0218 C/m^2)
        pol = np.einsum("iab,ib->a", born, pattern) / model.reference.volume * 16.02176634
    log(f"relaxed {mesh} supercell in {opt.nsteps} BFGS steps ({time.perf_counter() - t0:.1f} s): "
        f"E - E_cubic = {1000 * (e_min - model.reference.energy):.2f} meV/cell, "
        f"a = {cellpar[0] / mesh[0]:.4f} A, alpha = {cellpar[3]:.3f} deg, max |stress| "
        f"{np.abs(atoms.get_stress()).max():.1e} eV/A^3"
        + ("" if pol is None else f", P = {np.linalg.norm(pol):.3f} C/m^2 along {np.round(pol / np.linalg.norm(pol), 3)}"))
    atoms.write(outdir / "ground_state.extxyz")

    # batch evaluation through the same path users call: `sp-server eval`
    report = evaluate_file(model, outdir / "relax.traj", outdir / "relax_evaluated.extxyz", progress=progress)

    amplitudes = np.linspace(-1.4, 1.4, 57)
    well = _polar_path(model, pattern, amplitudes)
    well -= model.reference.energy
    summary = {
        "model": str(model_path), "supercell": list(mesh), "relax_steps": opt.nsteps,
        "energy_start_meV_per_cell": 1000 * (e_start / ncell - model.reference.energy),
        "energy_min_meV_per_cell": 1000 * (e_min - model.reference.energy),
        "lattice_a_A": cellpar[0] / mesh[0], "angle_deg": cellpar[3],
        "ground_state_displacements_A": pattern.tolist(),
        "polarization_C_m2": None if pol is None else pol.tolist(),
        "frames_evaluated": report.evaluated,
        "double_well_depth_meV_per_cell": float(1000 * well.min()),
    }
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2))
    from .figures import plt, save   # matplotlib is a dependency
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(amplitudes, 1000 * well)
    ax.axvline(1.0, color="0.7", ls=":")
    ax.set_xlabel("ground-state distortion amplitude")
    ax.set_ylabel("E - E_cubic (meV / cell)")
    ax.set_title("toy perovskite: polar double well")
    save(fig, outdir / "double_well.png", dpi=120)
    log(f"demo output in {outdir.resolve()}: model, ground_state.extxyz, relax_evaluated.extxyz, "
        "double_well.png, summary.json")
    return summary
