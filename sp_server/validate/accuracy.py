"""Accuracy on a held-out set (the paper's Fig. 2 and its RMSEs): model vs oracle energies, forces and stress on
labelled frames the model never saw, with the model's Bayesian error of each frame beside its actual error.

The held-out frames come either from a file (extxyz or any file ase.io reads with energies and forces, or an ase.db
such as an on-the-fly run's store.db, optionally with an ase.db selection like ``origin=holdout``), or are sampled
fresh: an i-PI NPT run of the model (the force server) on a small supercell from the R phase, frames of its second
half labelled by the oracle.  Units: energies meV per 5-atom cell relative to the reference energy of each side
(model: its reference; oracle frames: the oracle's energy of the model's cubic reference cell, so that an energy
offset between model and oracle does not count), forces eV/A, stress GPa (Voigt, ASE sign).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..model.model import Model
from ..otf.report import calibration, frame_pairs, rmse
from ..potential import Evaluator
from ..server.queue import is_progress_row


@dataclass
class Accuracy:
    source: str
    frames: int
    skipped: list                 # "frame k: reason" for frames left out
    rmse_energy_mev: float        # per 5-atom cell
    rmse_forces: float            # eV/A, every component
    rmse_stress_gpa: float        # every Voigt component (frames with stress)
    mae_energy_mev: float
    max_force_error: float        # largest |F_model - F_oracle| component, eV/A
    bayesian_force_error: list    # per frame: the model's predicted largest force-component std, eV/A (NaN: none)
    actual_force_error: list      # per frame: largest |dF| component, eV/A
    energy_offset_mev: float      # oracle energy of the cubic reference relative to the model's, meV/cell
    parity: dict = field(default_factory=dict, repr=False)   # plot data (not in as_dict)
    calibration: dict = field(default_factory=dict)          # see calibration()

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("parity")
        return d


def read_frames(path, select: Optional[str] = None):
    """Labelled frames of ``path`` (ase.io formats; an ase.db with the optional selection ``select``)."""
    import ase.io
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"held-out set {path} does not exist")
    if path.suffix == ".db":
        from ase.db import connect
        with connect(str(path), serial=True) as db:
            rows = list(db.select(select) if select else db.select())
        out = []
        for row in rows:
            if is_progress_row(row):   # a flag queue's progress row: no atoms
                continue
            atoms = row.toatoms()
            atoms.info["source"] = f"{path.name} id={row.id}"
            out.append(atoms)
        return out
    if select:
        raise ValueError(f"held-out set {path}: a selection ({select!r}) needs an ase.db file")
    frames = ase.io.read(path, index=":")
    for k, a in enumerate(frames):
        a.info.setdefault("source", f"{path.name} frame {k}")
    return frames


def accuracy(model: Model, frames, *, source: str = "", oracle_reference_energy: Optional[float] = None,
             log=print) -> Accuracy:
    """RMSEs of ``model`` on labelled ``frames`` (ASE Atoms with energy and forces; stress when present).
    ``oracle_reference_energy``: the oracle's energy of the model's cubic reference cell (eV per cell); without it the
    energies are compared as given (both relative to the model's reference energy)."""
    ev = Evaluator(model)
    energies, forces, stress, skipped, bayes, actual = [], [], [], [], [], []
    for k, atoms in enumerate(frames):
        name = atoms.info.get("source", f"frame {k}")
        try:
            atoms.get_potential_energy(), atoms.get_forces()
        except Exception as exc:   # no calculator / no stored results: that frame is unlabelled
            skipped.append(f"{name}: no energy and forces ({type(exc).__name__})")
            continue
        try:
            e, f, s, res = frame_pairs(ev, atoms, oracle_reference_energy, errors=model.posterior is not None)
        except ValueError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        energies.append(e)
        forces.append(f)
        if s is not None:
            stress.append(s)
        bayes.append(float(res.errors["force_max"]) if res.errors else float("nan"))
        actual.append(float(np.abs(f[:, 1] - f[:, 0]).max()))
    for s in skipped:
        log(f"held-out set: left out {s}")
    if not energies:
        raise ValueError(f"held-out set {source}: no labelled frame the model can evaluate ({len(skipped)} left out)")
    e = np.array(energies)
    f = np.concatenate(forces)
    st = np.array(stress).reshape(-1, 6, 2)
    offset = 0.0 if oracle_reference_energy is None else 1000 * (oracle_reference_energy - model.reference.energy)
    parity = {"validation": {"energy": e, "forces": f, "stress": st}}
    return Accuracy(source, len(energies), skipped, rmse(e), rmse(f), rmse(st),
                    float(np.mean(np.abs(e[:, 1] - e[:, 0]))), float(np.abs(f[:, 1] - f[:, 0]).max()), bayes, actual,
                    float(offset), parity, calibration(bayes, actual))


def sample_frames(model_path, oracle, outdir, *, supercell: int = 2, temperature: float = 300.0, frames: int = 20,
                  steps: int = 2000, seed: int = 2024, log=print, progress: bool = False) -> list:
    """Fresh held-out frames: an i-PI NPT MD of the model (``steps`` of 1 fs at ``temperature`` K on the
    ``supercell``^3 cell from the R soft mode), ``frames`` evenly spaced frames of its second half labelled by
    ``oracle``; written to ``outdir``/holdout.extxyz (eV, eV/A, eV/A^3)."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from tqdm.auto import tqdm

    from ..model.native import load_model
    from ..model.posterior import ErrorThreshold
    from ..otf.md import MDJob, MDSettings, run_md, trajectory_tail
    from ..otf.structures import polar_structure

    model = load_model(model_path)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    n = int(supercell)
    job = MDJob("holdout", polar_structure(model, (n, n, n), "R", 0.1), out / "md", float(temperature), int(steps),
                int(seed))
    stride = max(1, steps // (4 * frames))
    outcome = run_md(model_path, [job], str(out / "queue.db"), ErrorThreshold(),
                     MDSettings(trajectory_stride=stride))[0]
    late = trajectory_tail(out / "md" / "md.pos_0.extxyz", log)
    if outcome.status != "done":
        log(f"held-out MD ended {outcome.status} after {outcome.frames} frames: frames taken from what it ran")
    picks = np.unique(np.linspace(0, len(late) - 1, min(frames, len(late))).round().astype(int))
    labelled = []
    for k in tqdm(picks, desc="labelling the held-out set", disable=not progress, leave=False):
        atoms = late[int(k)].copy()
        atoms.calc = oracle
        try:
            e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        except Exception as exc:   # an oracle failure loses that frame only
            log(f"held-out frame {k}: oracle failed ({exc}); left out")
            continue
        atoms.calc = SinglePointCalculator(atoms, energy=float(e), forces=np.asarray(f, float),
                                           stress=np.asarray(s, float))
        atoms.info["source"] = f"held-out MD, frame {int(k)} of the second half"
        labelled.append(atoms)
    ase.io.write(out / "holdout.extxyz", labelled, format="extxyz")
    return labelled


def plot_errors(acc: Accuracy, path) -> Path:
    """The model's Bayesian force error vs its actual largest force error, frame by frame."""
    from ..figures import plt, save
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    b, a = np.array(acc.bayesian_force_error), np.array(acc.actual_force_error)
    ax.scatter(b, a, s=12)
    ok = np.isfinite(b)
    if ok.any():
        hi = max(float(np.nanmax(b)), float(a.max())) * 1.1
        ax.plot([0, hi], [0, hi], "k-", lw=0.6)
    ax.set_xlabel("Bayesian error: largest force std (eV/A)")
    ax.set_ylabel("actual largest |F_model - F_oracle| (eV/A)")
    ax.set_title("held-out frames: predicted vs actual error", fontsize=9)
    return save(fig, path)
