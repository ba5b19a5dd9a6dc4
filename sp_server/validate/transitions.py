"""Phase transitions from NPT MD (paper's Fig. 6): a supercell heated (and cooled) through a ladder of
temperatures, each stage an i-PI NPT run (flexible cell, Langevin thermostat and barostat) served by the sp_server
force server, which also evaluates the Bayesian error of the frames and queues the uncertain ones.

Each stage starts from the last frame of the previous one (positions and cell; velocities drawn at the new
temperature), so a heating run is a quasi-static ladder.  From the second half of each stage's trajectory:

- the polarization of every frame, P = e/V sum_i Z_i u_i (C/m^2; model Born charges, or nominal ionic charges when
  the model has none, declared in the result), u the displacements from the reference sites scaled with the cell;
- its components sorted by magnitude, |P|_1 >= |P|_2 >= |P|_3, averaged over frames (a domain-free phase
  indicator: R has three equal components, O two, T one, C none);
- the lattice parameters (pseudo-cubic a, b, c, A) and the largest Bayesian force error (eV/A).

A component counts as "on" when it exceeds ``on_fraction`` of the lowest-temperature stage's largest component
(default 0.35); the R-O, O-T and T-C transition temperatures are the midpoints of the two stages between which the
number of "on" components first falls below 3, 2 and 1 on heating (rises above on cooling).  Units: K, fs, GPa,
A, C/m^2.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..model.model import Model
from ..model.posterior import ErrorThreshold
from ..server.driver import read_trace
from .ground_state import E_PER_A2_IN_C_PER_M2, _charges, displacements

TRANSITIONS = (("R-O", 3), ("O-T", 2), ("T-C", 1))   # name, number of "on" components of the lower phase


@dataclass
class TransitionSettings:
    """The MD ladder: supercell n x n x n, temperatures (K) in heating order, steps per stage, timestep (fs)."""

    supercell: int = 12
    temperatures: tuple = (50.0, 100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 400.0)
    steps: int = 300
    timestep_fs: float = 2.0
    pressure_gpa: float = 0.0
    thermostat_tau_fs: float = 100.0
    barostat_tau_fs: float = 500.0
    cooling: bool = True
    stride: int = 10              # frames written and analysed
    error_stride: int = 20        # Bayesian errors every n-th frame
    on_fraction: float = 0.35
    seed: int = 12345
    timeout_s: float = 7200.0     # per stage


@dataclass
class Stage:
    """One temperature of a ladder (units in the module docstring)."""

    direction: str                 # "heating" or "cooling"
    temperature: float             # target, K
    temperature_md: float          # mean kinetic temperature of the analysed frames, K
    polarization_sorted: list      # <|P|_1>, <|P|_2>, <|P|_3>, C/m^2
    polarization_mean: list        # <P_x>, <P_y>, <P_z>, C/m^2
    lattice: list                  # <a>, <b>, <c> pseudo-cubic, A
    volume: float                  # A^3 per 5-atom cell
    on: int                        # components above the threshold (-1: no frame to analyse)
    phase: str                     # R, O, T or C from ``on`` ("?" without frames)
    max_force_error: float         # largest Bayesian force error of the stage's evaluated frames, eV/A
    flagged: int                   # frames the server queued (local maxima above the threshold, or untrusted)
    status: str                    # the MD outcome: done, untrusted, error, timeout
    frames: int
    seconds: float


@dataclass
class Transitions:
    supercell: int
    settings: dict
    charges: str
    stages: list = field(default_factory=list)
    temperatures: dict = field(default_factory=dict)   # direction -> {"R-O": K or None, ...}

    def as_dict(self) -> dict:
        return asdict(self)


PHASE_BY_ON = {3: "R", 2: "O", 1: "T", 0: "C"}


def frame_polarization(model: Model, mesh, atoms, charges) -> np.ndarray:
    """P (3,) C/m^2 of one frame whose atoms are in the order of ``model.supercell(mesh)``: displacements from the
    reference sites scaled with the frame's cell, uniform translation removed."""
    u = displacements(model, mesh, atoms, frame_cell=True)
    dipole = np.einsum("iab,Lib->a", charges, u)
    return dipole / atoms.get_volume() * E_PER_A2_IN_C_PER_M2


def count_on(sorted_p, reference: float, fraction: float) -> int:
    return int(np.sum(np.asarray(sorted_p) > fraction * reference))


def detect(stages: list, direction: str) -> dict:
    """Transition temperatures (K) of one direction from the stages' ``on`` counts (module docstring)."""
    seq = [s for s in stages if s.direction == direction and s.on >= 0]
    if direction == "cooling":               # cooling starts from the top of the heating ladder
        seq = [s for s in stages if s.direction == "heating" and s.on >= 0][-1:] + seq
    out = {}
    for name, n in TRANSITIONS:
        t = None
        for a, b in zip(seq[:-1], seq[1:]):
            if direction == "heating" and a.on >= n > b.on:
                t = 0.5 * (a.temperature + b.temperature)
                break
            if direction == "cooling" and a.on < n <= b.on:
                t = 0.5 * (a.temperature + b.temperature)
                break
        out[name] = t
    return out


def _trace_stats(trace: Path) -> float:
    """Largest force error (eV/A) in a server trace (frames without errors are NaN)."""
    vals = read_trace(trace)["err_force_max"] if trace.exists() else np.array([])
    return float(np.nanmax(vals)) if np.isfinite(vals).any() else float("nan")


def phase_transitions(model_path, outdir, settings: TransitionSettings = TransitionSettings(), *, start=None,
                      log=print, progress: bool = False) -> Transitions:
    """Run the heating (and cooling) ladder of ``settings`` for the model file ``model_path`` in ``outdir`` (one
    folder per stage with i-PI's input, log and trajectory, the server's traces and queue).  ``start``: the first
    stage's structure (atoms in the order of ``model.supercell``), default the model's R soft mode at 0.1 A."""
    from tqdm.auto import tqdm

    from ..model.native import load_model
    from ..otf.md import MDJob, MDSettings, run_md, trajectory_tail
    from ..otf.structures import polar_structure

    model = load_model(model_path)
    n = int(settings.supercell)
    mesh = (n, n, n)
    ncell = n ** 3
    charges, label = _charges(model)
    if charges is None:
        raise ValueError(f"phase transitions: no charges to compute the polarization ({label})")
    if settings.steps % settings.stride:
        raise ValueError(f"steps ({settings.steps}) must be a multiple of stride ({settings.stride})")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    md = MDSettings(timestep_fs=settings.timestep_fs, pressure_gpa=settings.pressure_gpa,
                    thermostat_tau_fs=settings.thermostat_tau_fs, barostat_tau_fs=settings.barostat_tau_fs,
                    trajectory_stride=settings.stride, timeout_s=settings.timeout_s,
                    error_stride=settings.error_stride)
    temps = [float(t) for t in settings.temperatures]
    ladder = [("heating", t) for t in temps]
    if settings.cooling:
        ladder += [("cooling", t) for t in temps[::-1][1:]]
    atoms = start.copy() if start is not None else polar_structure(model, mesh, "R", 0.1)
    if len(atoms) != ncell * model.natoms:
        raise ValueError(f"phase transitions: start has {len(atoms)} atoms, the {n}^3 supercell {ncell * model.natoms}")
    result = Transitions(n, asdict(settings), label)
    reference: Optional[float] = None
    bar = tqdm(total=len(ladder) * settings.steps, desc="phase transitions (MD steps)", unit="step",
               disable=not progress)
    for k, (direction, temp) in enumerate(ladder):
        t0 = time.monotonic()
        folder = out / f"{k:02d}_{direction}_{temp:06.1f}K"
        job = MDJob("md", atoms, folder / "md", temp, settings.steps, settings.seed + k)
        done0 = bar.n
        outcome = run_md(model_path, [job], str(folder / "queue.db"), ErrorThreshold(), md,
                         progress=lambda frames: bar.update(max(0, done0 + min(frames, settings.steps) - bar.n)))[0]
        bar.update(max(0, done0 + settings.steps - bar.n))
        tail = trajectory_tail(folder / "md" / "md.pos_0.extxyz", log)
        if tail:
            pols = np.array([frame_polarization(model, mesh, f, charges) for f in tail])
            sorted_p = np.sort(np.abs(pols), axis=1)[:, ::-1].mean(axis=0)
            mean_p = pols.mean(axis=0)
            lat = np.array([f.cell.cellpar()[:3] / n for f in tail]).mean(axis=0)
            vol = float(np.mean([f.get_volume() for f in tail]) / ncell)
        else:       # the stage ended before its first trajectory frame
            sorted_p = mean_p = lat = np.full(3, np.nan)
            vol = float("nan")
        if reference is None and tail:
            reference = float(sorted_p[0])
        on = count_on(sorted_p, reference, settings.on_fraction) if tail else -1
        stage = Stage(direction, temp, _md_temperature(folder / "md" / "md.out", settings.steps // 2),
                      sorted_p.tolist(), mean_p.tolist(), lat.tolist(), vol, on, PHASE_BY_ON.get(on, "?"),
                      _trace_stats(folder / "traces" / "trace_0.csv"), _queued(folder / "queue.db"), outcome.status,
                      outcome.frames, time.monotonic() - t0)
        result.stages.append(stage)
        log(f"{direction} {temp:.0f} K: |P| sorted {', '.join(f'{x:.3f}' for x in sorted_p)} C/m^2 -> "
            f"{stage.phase}; a,b,c {', '.join(f'{x:.4f}' for x in lat)} A; max force error "
            f"{stage.max_force_error:.3f} eV/A, {stage.flagged} flagged ({stage.seconds:.0f} s, {outcome.status})")
        if outcome.status != "done":
            log(f"stage {folder.name} ended {outcome.status}{f' ({outcome.message})' if outcome.message else ''}: "
                f"the MD left the model's trusted range or failed (see {folder / 'md' / 'ipi.log'} and the queue "
                f"{folder / 'queue.db'}); the ladder stops here")
            break
        atoms = tail[-1]
    bar.close()
    for direction in ("heating", "cooling"):
        if any(s.direction == direction for s in result.stages):
            result.temperatures[direction] = detect(result.stages, direction)
    return result


def _md_temperature(md_out: Path, after_step: int) -> float:
    """Mean i-PI kinetic temperature (K) after ``after_step`` from its properties file."""
    try:
        data = np.loadtxt(md_out, comments="#", ndmin=2)
    except (OSError, ValueError):
        return float("nan")
    keep = data[data[:, 0] >= after_step]
    return float(keep[:, 3].mean()) if len(keep) else float("nan")


def _queued(url: Path) -> int:
    if not url.exists():
        return 0
    from ase.db import connect

    from ..server.queue import FRAME_ROWS
    with connect(str(url)) as db:
        return db.count(FRAME_ROWS)


def plot_transitions(result: Transitions, path) -> Path:
    """Fig. 6: sorted polarization components and pseudo-cubic lattice parameters vs temperature."""
    from ..figures import plt, save
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True)
    for direction, ls, mk in (("heating", "-", "o"), ("cooling", "--", "s")):
        seq = [s for s in result.stages if s.direction == direction]
        if not seq:
            continue
        t = [s.temperature for s in seq]
        p = np.array([s.polarization_sorted for s in seq])
        lat = np.array([s.lattice for s in seq])
        for c in range(3):
            ax.plot(t, p[:, c], ls=ls, marker=mk, ms=3, color=f"C{c}", label=f"|P|$_{c + 1}$ ({direction})")
            bx.plot(t, np.sort(lat, axis=1)[:, ::-1][:, c], ls=ls, marker=mk, ms=3, color=f"C{c}")
        for name, temp in result.temperatures.get(direction, {}).items():
            if temp is not None:
                ax.axvline(temp, color="0.6", ls=ls, lw=0.8)
                ax.text(temp, ax.get_ylim()[1] * 0.95, name, fontsize=7, rotation=90, va="top", ha="right")
    ax.set_ylabel("sorted |P| components (C/m$^2$)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"NPT MD, {result.supercell}$^3$ supercell (i-PI + sp_server)", fontsize=9)
    bx.set_xlabel("temperature (K)")
    bx.set_ylabel("pseudo-cubic a, b, c (A)")
    return save(fig, path)
