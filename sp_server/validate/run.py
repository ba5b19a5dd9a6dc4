"""`sp-server validate`: the validation items of a model (and of its oracle, side by side, where affordable) into
a report folder: summary.md (tables and figures), results.json (every number), CSV and PNG per figure.

Items (each can run alone; the ones that need relaxed phases compute them first):

==============  =====================================================================  ===================
item            what                                                                   calculators
==============  =====================================================================  ===================
ground_state    Table 1: relaxed R (and O, T) unit cells, energy vs cubic, P           model + oracle
metastable      Table 2 / Fig. 3: P4/nmm, Pmma, Cmcm, P4mm, Amm2, R3m, Pbcm             model + oracle
phonons         Fig. 4: dispersions of the cubic reference and each relaxed phase        model + oracle
transport       Fig. 5: phono3py Wigner kappa, Cv, group velocities, MFPs (R phase)     model
transitions     Fig. 6: NPT MD heating/cooling through i-PI with the force server        model
double_well     Fig. 7: energy along cubic -> R ground-state distortion                  model + oracle
accuracy        RMSEs on a held-out set (a file, or fresh MD frames labelled by oracle)   model vs oracle
==============  =====================================================================  ===================

An item that fails is reported (its error in results.json and summary.md) and the others go on; results.json and
summary.md are rewritten after every item, so an interrupted run keeps what it finished.  Defaults finish on two
cores in minutes; :meth:`ValidationSettings.full` gives publication settings (hours).
Units: A, degrees, A^3 and meV per 5-atom cell relative to each calculator's cubic reference, C/m^2, THz, K,
W/(m K), J/(K mol), eV/A, GPa.
"""
from __future__ import annotations

import csv
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..figures import plt, save
from ..io.jsonfile import write_json
from ..model.native import load_model
from . import ITEMS
from ..otf.report import calibration_lines
from .ground_state import cubic_energy, double_well, ground_state, model_calculator
from .phases import PHASES
from .transitions import TransitionSettings
from .transport import DEFAULT_TEMPERATURES


@dataclass
class ValidationSettings:
    """Settings of every item; the defaults are the quick ones (minutes on two cores)."""

    phases: tuple = ("R",)                     # relaxed by ground_state, dispersions by phonons
    relax_fmax: float = 1e-3                   # eV/A (and the cell filter's stress equivalent)
    metastable: tuple = tuple(PHASES)
    metastable_fmax: float = 2e-3
    phonon_supercell: tuple = (2, 2, 2)
    phonon_points: int = 31                    # q-points per path segment
    transport_supercell: tuple = (2, 2, 2)
    transport_mesh: tuple = (8, 8, 8)
    transport_temperatures: tuple = DEFAULT_TEMPERATURES
    transitions: TransitionSettings = field(default_factory=TransitionSettings)
    double_well_points: int = 29
    holdout: tuple = ()                        # labelled files (extxyz, ase.db, ...), one held-out set each
    holdout_select: Optional[str] = None       # ase.db selection, e.g. "origin=holdout" (for every .db file)
    holdout_frames: int = 20                   # frames of each fresh held-out set
    holdout_temperature: float = 300.0         # K, of the fresh held-out MDs
    holdout_supercells: Optional[tuple] = None  # N of the fresh N^3 held-out MDs; None: (2, 4) without files,
                                               # none beside files

    def __post_init__(self):
        if isinstance(self.holdout, (str, Path)):
            self.holdout = (str(self.holdout),)
        self.holdout = tuple(str(h) for h in self.holdout)

    def fresh_holdout_supercells(self) -> tuple:
        if self.holdout_supercells is not None:
            return tuple(int(n) for n in self.holdout_supercells)
        return () if self.holdout else (2, 4)

    @classmethod
    def full(cls, **overrides) -> "ValidationSettings":
        """Publication settings: tighter relaxations, denser q-meshes and paths, a 16^3 MD ladder every 25 K with
        2000 steps per stage, 100 held-out frames."""
        temps = tuple(float(t) for t in range(25, 501, 25))
        base = cls(phases=("R", "O", "T"), relax_fmax=2e-4, metastable_fmax=5e-4, phonon_supercell=(3, 3, 3),
                   phonon_points=61, transport_mesh=(16, 16, 16),
                   transport_temperatures=tuple(float(t) for t in range(50, 1001, 50)),
                   transitions=TransitionSettings(supercell=16, temperatures=temps, steps=2000, error_stride=50,
                                                  stride=20),
                   holdout_frames=100)
        return replace(base, **overrides)

    def as_dict(self) -> dict:
        return asdict(self)


class _Context:
    """What the items share: the model, the calculators, the relaxed phases (computed once, on demand)."""

    def __init__(self, model_path, out: Path, calcs: dict, settings: ValidationSettings, log, progress: bool):
        self.model_path, self.out, self.calcs, self.settings = model_path, out, calcs, settings
        self.model = load_model(model_path)
        self.log, self.progress = log, progress
        self._gs: dict = {}

    def ground_states(self, phases) -> dict:
        for phase in phases:
            for name, calc in self.calcs.items():
                if name in self._gs.get(phase, {}):
                    continue
                t0 = time.monotonic()
                g = ground_state(self.model, calc, name, phase, fmax=self.settings.relax_fmax)
                self._gs.setdefault(phase, {})[name] = g
                self.log(f"ground state {phase} with {name}: a {g.a:.4f} A, alpha {g.alpha:.3f} deg, E - E_cubic "
                         f"{g.energy_mev:.2f} meV/cell, |P| {g.polarization_norm:.3f} C/m^2 ({g.steps} steps, "
                         f"{time.monotonic() - t0:.1f} s{'' if g.converged else ', NOT converged'})")
        return {ph: self._gs[ph] for ph in phases}


def run_validation(model_path, outdir, *, oracle=None, oracle_name: str = "oracle", items=ITEMS,
                   settings: Optional[ValidationSettings] = None, phases=None, log=None,
                   progress: bool = False) -> dict:
    """Run ``items`` for the model file ``model_path`` (and ``oracle``, an ASE calculator, where affordable); write
    ``outdir``; return the results (``results["failed"]`` names the items that raised).  ``log``: one line per
    step (default: printed, above the progress bars when ``progress``)."""
    if log is None:
        from tqdm.auto import tqdm
        log = tqdm.write if progress else print
    settings = settings or ValidationSettings()
    if phases is not None:
        settings = replace(settings, phases=tuple(phases))
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        raise ValueError(f"unknown validation item(s) {unknown}: choose among {list(ITEMS)}")
    items = [i for i in ITEMS if i in items]
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    calcs = {"model": model_calculator(load_model(model_path))}
    if oracle is not None:
        oracle_name = oracle_name if oracle_name != "model" else "oracle:model"   # a model file as the oracle
        calcs[oracle_name] = oracle
    ctx = _Context(model_path, out, calcs, settings, log, progress)
    results: dict = {"model": str(model_path), "oracle": oracle_name if oracle is not None else None,
                     "settings": _jsonable(settings.as_dict()), "items": items, "failed": {}, "seconds": {}}
    for item in items:
        t0 = time.monotonic()
        try:
            results[item] = ITEM_FUNCTIONS[item](ctx)
        except Exception as exc:   # one item's failure is reported; the others go on
            log(f"validation item {item} FAILED: {type(exc).__name__}: {exc}")
            results["failed"][item] = f"{type(exc).__name__}: {exc}"
            (out / f"{item}.error.txt").write_text(traceback.format_exc())
        results["seconds"][item] = round(time.monotonic() - t0, 1)
        _write(results, out)
    log(f"validation report in {out.resolve()}: summary.md, results.json"
        + (f"; FAILED: {', '.join(results['failed'])}" if results["failed"] else ""))
    return results


def _write(results: dict, out: Path):
    write_json(out / "results.json", _jsonable(results))
    (out / "summary.md").write_text(_summary(results))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# ---------------------------------------------------------------------------------------------------- items
def _item_ground_state(ctx: _Context) -> dict:
    gs = ctx.ground_states(ctx.settings.phases)
    return {ph: {n: g.as_dict() for n, g in by.items()} for ph, by in gs.items()}


def _item_metastable(ctx: _Context) -> dict:
    from .phases import metastable_phases
    res = metastable_phases(ctx.model, ctx.calcs, ctx.settings.metastable, log=ctx.log, progress=ctx.progress,
                            fmax=ctx.settings.metastable_fmax)
    # a relaxation that failed is {"error": message}: its row says so, the other phases are reported as usual
    data = {ph: {n: {"error": p} if isinstance(p, str) else p.as_dict() for n, p in by.items()}
            for ph, by in res.items()}
    names = list(ctx.calcs)
    with open(ctx.out / "metastable.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["phase"] + [f"{n}_{k}" for n in names for k in ("space_group", "energy_meV_per_cell",
                                                                      "b_site_A", "volume_A3_per_cell")])
        for ph, by in data.items():
            w.writerow([ph] + [by[n].get(k, "failed" if k == "space_group" else "") for n in names
                               for k in ("space_group", "energy_mev", "b_site", "volume")])
    _plot_metastable(data, names, ctx.out / "metastable.png")
    return data


def _item_phonons(ctx: _Context) -> dict:
    """Dispersions of the cubic reference (each calculator at the model's reference cell) and of each relaxed
    phase (each calculator at its own relaxed structure); PNG per phase, differences to the model."""
    from .phonons import compare, dispersion
    gs = ctx.ground_states(ctx.settings.phases)
    structures = {"C": {n: ctx.model.supercell((1, 1, 1)) for n in ctx.calcs}}
    structures.update({ph: {n: g.structure for n, g in by.items()} for ph, by in gs.items()})
    res = {}
    for phase, by in structures.items():
        t0 = time.monotonic()
        disp = {n: dispersion(atoms, ctx.calcs[n], n, phase, supercell=ctx.settings.phonon_supercell,
                              npoints=ctx.settings.phonon_points) for n, atoms in by.items()}
        entry = {"dispersions": {n: d.as_dict() for n, d in disp.items()}}
        entry["differences"] = {n: compare(disp["model"], disp[n]) for n in disp if n != "model"}
        res[phase] = entry
        _plot_dispersion(disp, phase, ctx.out / f"phonons_{phase}.png")
        ctx.log(f"phonons {phase}: lowest model frequency {np.min(disp['model'].frequencies):.2f} THz"
                + "".join(f"; vs {n}: RMS {d['rms_thz']:.3f} THz, max {d['max_thz']:.3f} THz"
                          for n, d in entry["differences"].items()) + f" ({time.monotonic() - t0:.1f} s)")
    return res


def _item_transport(ctx: _Context) -> dict:
    from .transport import nac_params, plot_transport, thermal_transport
    g = ctx.ground_states(("R",))["R"]["model"]
    s = ctx.settings
    t = thermal_transport(g.structure, ctx.calcs["model"], supercell=s.transport_supercell, mesh=s.transport_mesh,
                          temperatures=s.transport_temperatures, nac=nac_params(ctx.model), progress=ctx.progress)
    plot_transport(t, ctx.out / "transport.png")
    with open(ctx.out / "transport.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["T_K", "Cv_J_per_K_mol", "kappa_particle_W_per_mK", "kappa_wave_W_per_mK", "kappa_total_W_per_mK"])
        for row in zip(t.temperatures, t.heat_capacity, t.kappa_particle, t.kappa_wave, t.kappa_total):
            w.writerow(row)
    it = t.temperatures.index(t.t_ref)
    ctx.log(f"transport (R, {'x'.join(map(str, t.mesh))} mesh): kappa at {t.t_ref:g} K particle "
            f"{t.kappa_particle[it]:.2f} + wave {t.kappa_wave[it]:.2f} W/(m K), kappa ~ T^-{t.exponent:.3f}, Cv "
            f"{t.heat_capacity[0]:.1f} -> {t.heat_capacity[-1]:.1f} J/(K mol), {t.imaginary_modes} imaginary modes")
    d = t.as_dict()
    # the per-mode lists are in the CSV/PNG; keep the JSON readable: cumulative curve thinned to 200 points
    cum = d["mfp_cumulative"]
    keep = np.unique(np.linspace(0, len(cum["mfp_nm"]) - 1, min(200, len(cum["mfp_nm"]))).round().astype(int))
    cum["mfp_nm"] = [cum["mfp_nm"][k] for k in keep]
    cum["kappa"] = [cum["kappa"][k] for k in keep]
    return d


def _item_transitions(ctx: _Context) -> dict:
    from .transitions import phase_transitions, plot_transitions
    s = ctx.settings.transitions
    ctx.log(f"phase transitions: {s.supercell}^3 supercell, {len(s.temperatures)} temperatures x {s.steps} steps "
            f"of {s.timestep_fs} fs{' heating and cooling' if s.cooling else ' heating'}")
    res = phase_transitions(ctx.model_path, ctx.out / "transitions_md", s, log=ctx.log, progress=ctx.progress)
    plot_transitions(res, ctx.out / "transitions.png")
    with open(ctx.out / "transitions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["direction", "T_K", "T_md_K", "P1_C_per_m2", "P2_C_per_m2", "P3_C_per_m2", "a_A", "b_A", "c_A",
                    "phase", "max_force_error_eV_per_A", "flagged", "status"])
        for st in res.stages:
            w.writerow([st.direction, st.temperature, st.temperature_md, *st.polarization_sorted, *st.lattice,
                        st.phase, st.max_force_error, st.flagged, st.status])
    ctx.log(f"transition temperatures: {res.temperatures}")
    return res.as_dict()


def _item_double_well(ctx: _Context) -> dict:
    pattern = ctx.ground_states(("R",))["R"]["model"].displacements
    amps = np.linspace(-1.4, 1.4, ctx.settings.double_well_points)
    dw = double_well(ctx.model, ctx.calcs, pattern, amps)
    _plot_double_well(dw, ctx.out / "double_well.png")
    with open(ctx.out / "double_well.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["amplitude"] + [f"{n}_meV_per_cell" for n in dw.energies])
        for k, a in enumerate(dw.amplitudes):
            w.writerow([a] + [dw.energies[n][k] for n in dw.energies])
    ctx.log(f"double well: depth {min(dw.energies['model']):.2f} meV/cell (model)"
            + "".join(f", {min(v):.2f} ({n})" for n, v in dw.energies.items() if n != "model"))
    return dw.as_dict()


def _item_accuracy(ctx: _Context) -> dict:
    """One held-out set per file of ``holdout`` and per fresh MD cell of ``fresh_holdout_supercells()``; each with
    its RMSEs, parity and Bayesian-vs-actual figures (``accuracy_parity_K.png``, ``accuracy_bayesian_K.png``, K =
    1, 2, ...).  A set that cannot be read or labelled is reported and the others go on."""
    from ..otf.report import plot_parity
    from .accuracy import accuracy, plot_errors, read_frames, sample_frames
    s = ctx.settings
    oracles = [n for n in ctx.calcs if n != "model"]
    fresh = s.fresh_holdout_supercells()
    if not s.holdout and not (fresh and oracles):
        raise ValueError("accuracy needs a held-out set: --holdout FILE, or an --oracle to label fresh MD frames "
                         "(--holdout-md N)")
    if fresh and not oracles:
        raise ValueError(f"fresh held-out MDs on {fresh} need an --oracle to label them")
    oref_md = cubic_energy(ctx.model, ctx.calcs[oracles[0]]) if fresh else None  # the oracle's own cubic energy
    jobs = [("file", h) for h in s.holdout] + [("md", n) for n in fresh]
    sets, failed = [], {}
    for k, (kind, what) in enumerate(jobs, start=1):
        try:
            oref = None   # a file: energies compared as given (both relative to the model's reference energy)
            if kind == "file":
                frames = read_frames(what, s.holdout_select)   # a selection on a file that is no ase.db: an error
                sel = f" ({s.holdout_select})" if s.holdout_select else ""
                name, source = Path(what).name + sel, f"{what}{sel}"
            else:
                frames = sample_frames(ctx.model_path, ctx.calcs[oracles[0]], ctx.out / f"holdout_{what}",
                                       supercell=what, temperature=s.holdout_temperature, frames=s.holdout_frames,
                                       log=ctx.log, progress=ctx.progress)
                name = f"fresh MD {what}^3 {s.holdout_temperature:g} K"
                source = (f"{len(frames)} frames of a fresh {s.holdout_temperature:g} K NPT MD of the model "
                          f"({what}^3), labelled by {oracles[0]}")
                oref = oref_md
            acc = accuracy(ctx.model, frames, source=source, oracle_reference_energy=oref, log=ctx.log)
        except Exception as exc:   # one set's failure is reported; the others go on
            failed[str(what)] = f"{type(exc).__name__}: {exc}"
            ctx.log(f"held-out set {what} FAILED: {failed[str(what)]}")
            continue
        plot_parity(acc.parity, ctx.out / f"accuracy_parity_{k}.png", title=f"held-out set: {name}")
        plot_errors(acc, ctx.out / f"accuracy_bayesian_{k}.png")
        c = acc.calibration
        ctx.log(f"held-out accuracy, {name} ({acc.frames} frames): energy {acc.rmse_energy_mev:.2f} meV/cell, "
                f"forces {acc.rmse_forces:.3f} eV/A, stress {acc.rmse_stress_gpa:.3f} GPa (RMSE)"
                + (f"; Bayesian vs actual force error: rank correlation {c['spearman']:.2f}, top-quartile precision "
                   f"{c['top_quartile_precision']:.2f}" if "spearman" in c else ""))
        sets.append({"name": name, "figures": [f"accuracy_parity_{k}.png", f"accuracy_bayesian_{k}.png"],
                     **acc.as_dict()})
    if not sets:
        raise ValueError("no held-out set could be evaluated: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return {"sets": sets, "failed": failed}


ITEM_FUNCTIONS = {"ground_state": _item_ground_state, "metastable": _item_metastable, "phonons": _item_phonons,
                  "transport": _item_transport, "transitions": _item_transitions, "double_well": _item_double_well,
                  "accuracy": _item_accuracy}


# ---------------------------------------------------------------------------------------------------- figures
def _plot_metastable(data: dict, names: list, path: Path):
    phases = list(data)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(names)
    x = np.arange(len(phases))
    for k, n in enumerate(names):
        ax.bar(x + k * width, [data[p][n].get("energy_mev", np.nan) for p in phases], width, label=n)
        bx.bar(x + k * width, [data[p][n].get("b_site", np.nan) for p in phases], width, label=n)
    for a, label in ((ax, "E - E_cubic (meV / 5-atom cell)"), (bx, "largest B-site displacement (A)")):
        a.set_xticks(x + width * (len(names) - 1) / 2)
        a.set_xticklabels(phases, fontsize=8)
        a.set_ylabel(label)
        a.legend(fontsize=8)
    ax.set_title("metastable phases, relaxed under symmetry", fontsize=9)
    save(fig, path)


def _plot_dispersion(disp: dict, phase: str, path: Path):
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"model": dict(color="tab:blue", lw=1.2)}
    for n, d in disp.items():
        f = np.asarray(d.frequencies)
        x = np.asarray(d.distances)
        style = styles.get(n, dict(color="tab:red", lw=1.0, ls="--"))
        edges = np.concatenate([[0], np.cumsum(d.segments)])
        for k, (i, j) in enumerate(zip(edges[:-1], edges[1:])):
            for band in range(f.shape[1]):
                ax.plot(x[i:j], f[i:j, band], label=n if band == 0 and k == 0 else None, **style)
    d0 = next(iter(disp.values()))
    for t in d0.ticks:
        ax.axvline(t, color="0.8", lw=0.6)
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xticks(d0.ticks)
    ax.set_xticklabels(d0.labels)
    ax.set_xlim(d0.ticks[0], d0.ticks[-1])
    ax.set_ylabel("frequency (THz; imaginary < 0)")
    ax.set_title(f"phonons, {phase} ({'cubic reference' if phase == 'C' else 'relaxed'}, pseudo-cubic path)",
                 fontsize=9)
    ax.legend(fontsize=8)
    save(fig, path)


def _plot_double_well(dw, path: Path):
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, e in dw.energies.items():
        ax.plot(dw.amplitudes, e, "o-" if name == "model" else "s--", ms=3, label=name)
    ax.axvline(1.0, color="0.7", ls=":")
    ax.axvline(-1.0, color="0.7", ls=":")
    ax.set_xlabel("amplitude of the model's R ground-state distortion")
    ax.set_ylabel("E - E_cubic (meV / cell)")
    ax.set_title("double well: cubic -> rhombohedral (unit cell, cubic lattice)", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, path)


# ---------------------------------------------------------------------------------------------------- summary
def _fmt(x, f=".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, f)


def _summary(results: dict) -> str:
    lines = ["# Validation report", "", f"model: `{results['model']}`; oracle: {results['oracle'] or '-'}", ""]
    for item, err in results.get("failed", {}).items():
        lines += [f"**{item} FAILED**: {err} (traceback in `{item}.error.txt`)", ""]
    for item in results.get("items", ITEMS):
        if item in results and item in SECTIONS:
            lines += SECTIONS[item](results[item])
    if results.get("seconds"):
        lines += ["Time per item (s): " + ", ".join(f"{k} {v:g}" for k, v in results["seconds"].items()), ""]
    return "\n".join(lines) + "\n"


def _section_ground_state(data: dict) -> list:
    lines = []
    for phase, by in data.items():
        names = list(by)
        lines += [f"## Ground state, {phase} phase (relaxed unit cell; Table 1)", "",
                  "| quantity | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        rows = [("a, b, c (A)", "lengths", ".4f"), ("alpha, beta, gamma (deg)", "angles", ".3f"),
                ("volume (A^3/cell)", "volume", ".3f"), ("E - E_cubic (meV/cell)", "energy_mev", ".2f"),
                ("P norm (C/m^2)", "polarization_norm", ".3f"), ("P (C/m^2)", "polarization", ".3f"),
                ("relaxation steps", "steps", "d")]
        for label, key, f in rows:
            cells = [", ".join(_fmt(x, f) for x in by[n][key]) if isinstance(by[n][key], list)
                     else _fmt(by[n][key], f) for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        ti = {n: np.linalg.norm(by[n]["displacements"][1]) for n in names}
        lines.append("| B-site displacement (A) | " + " | ".join(_fmt(ti[n]) for n in names) + " |")
        lines += ["", f"Polarization from: {by['model']['born_charges']}.", ""]
    return lines


def _section_metastable(data: dict) -> list:
    names = list(next(iter(data.values())))
    others = [n for n in names if n != "model"]
    head = ["phase", "supercell"] + [f"E {n} (meV/cell)" for n in names] + [f"abs(dE) vs {n}" for n in others]
    head += [f"B-site {n} (A)" for n in names] + ["space group (model)"]
    lines = ["## Metastable phases (Table 2, Fig. 3; relaxed under symmetry)", "", "![metastable](metastable.png)",
             "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    failed = []
    for ph, by in data.items():
        m = by["model"]
        energy = {n: by[n].get("energy_mev", np.nan) for n in names}
        row = [ph, "x".join(map(str, PHASES[ph][0]))] + [_fmt(energy[n], ".2f") for n in names]
        row += [_fmt(abs(energy["model"] - energy[n]), ".2f") for n in others]
        row += [_fmt(by[n].get("b_site", np.nan), ".3f") for n in names]
        row += ["relaxation FAILED" if "error" in m else m["space_group"] + ("" if m["kept_symmetry"] else
                                                                               " (collapsed)")]
        lines.append("| " + " | ".join(row) + " |")
        failed += [f"- {ph} with {n}: {by[n]['error']}" for n in names if "error" in by[n]]
    if failed:
        lines += ["", "Relaxations that failed (a model relaxation that leaves the model's range is a hole of the "
                  "model along that phase's path):", *failed]
    lines += ["", "Mode amplitudes (norm of each wave vector's component of the relaxed displacements, A) are in "
              "results.json (`amplitudes`).", ""]
    return lines


def _section_phonons(data: dict) -> list:
    lines = []
    for phase, entry in data.items():
        lines += [f"## Phonons, {phase} (Fig. 4)", "", f"![phonons {phase}](phonons_{phase}.png)", ""]
        for n, d in entry["differences"].items():
            lines.append(f"- model vs {n}: RMS {d['rms_thz']:.3f} THz, max {d['max_thz']:.3f} THz; lowest "
                         f"frequency {d['lowest_model_thz']:.2f} (model) vs {d['lowest_other_thz']:.2f} THz")
        lines.append("")
    return lines


def _section_transport(t: dict) -> list:
    cum = t["mfp_cumulative"]
    lines = ["## Thermal transport, R phase (Fig. 5; phono3py, Wigner/SMM19 RTA, model force constants)", "",
             "![transport](transport.png)", "",
             f"fc3 supercell {'x'.join(map(str, t['supercell']))}, q-mesh {'x'.join(map(str, t['mesh']))}, "
             f"{t['displaced_supercells']} displaced supercells; NAC: {'yes' if t['nac'] else 'no (no Born charges)'}"
             f"; {t['imaginary_modes']} imaginary modes on the mesh (skipped).", "",
             "| T (K) | Cv (J/K/mol) | kappa particle | kappa wave | kappa total (W/m/K) |", "|---|---|---|---|---|"]
    for row in zip(t["temperatures"], t["heat_capacity"], t["kappa_particle"], t["kappa_wave"], t["kappa_total"]):
        lines.append("| " + " | ".join([f"{row[0]:g}"] + [_fmt(x, ".3f") for x in row[1:]]) + " |")
    lines += ["", f"kappa_total ~ T^-n with n = {_fmt(t['exponent'], '.3f')} (T >= {t['fit_tmin']:g} K; paper: "
              f"0.933). At {t['t_ref']:g} K, {_fmt(100 * (cum['fraction_below_40nm'] or float('nan')), '.1f')}% of "
              f"the particle kappa comes from mean free paths below 40 nm; 90% from below "
              f"{_fmt(cum['mfp_90_percent_nm'], '.1f')} nm (paper: 90% below 40 nm).", ""]
    return lines


def _section_transitions(t: dict) -> list:
    lines = ["## Phase transitions (Fig. 6; NPT MD through i-PI with the sp_server force server)", "",
             "![transitions](transitions.png)", "",
             f"{t['supercell']}^3 supercell, {t['settings']['steps']} steps of {t['settings']['timestep_fs']} fs per "
             f"temperature, P = {t['settings']['pressure_gpa']} GPa; polarization from {t['charges']}.", "",
             "| direction | T (K) | sorted abs(P) (C/m^2) | a, b, c (A) | phase | max Bayesian force error (eV/A) | "
             "flagged | MD |", "|---|---|---|---|---|---|---|---|"]
    for s in t["stages"]:
        lines.append(f"| {s['direction']} | {s['temperature']:g} | "
                     + ", ".join(_fmt(x, '.3f') for x in s["polarization_sorted"]) + " | "
                     + ", ".join(_fmt(x, '.4f') for x in s["lattice"])
                     + f" | {s['phase']} | {_fmt(s['max_force_error'], '.3f')} | {s['flagged']} | {s['status']} |")
    lines.append("")
    for direction, temps in t["temperatures"].items():
        lines.append(f"- {direction}: " + ", ".join(f"{k} {_fmt(v, '.0f')} K" if v is not None else f"{k} not seen"
                                                    for k, v in temps.items()))
    bad = [s for s in t["stages"] if s["status"] != "done"]
    if bad:
        lines.append(f"- the ladder stopped at {bad[0]['direction']} {bad[0]['temperature']:g} K ({bad[0]['status']}): "
                     "the MD left the model's trusted range there; temperatures above are not covered")
    lines.append("")
    return lines


def _section_double_well(dw: dict) -> list:
    lines = ["## Double well (Fig. 7)", "", "![double well](double_well.png)", "",
             "| calculator | depth (meV/cell) | at abs(amplitude) |", "|---|---|---|"]
    for n, e in dw["energies"].items():
        k = int(np.argmin(e))
        lines.append(f"| {n} | {e[k]:.2f} | {abs(dw['amplitudes'][k]):.2f} |")
    return lines + [""]


def _section_accuracy(data: dict) -> list:
    sets = data["sets"]
    lines = ["## Accuracy on held-out sets (never trained on)", "",
             "| held-out set | frames | energy (meV/cell) | forces (eV/A) | stress (GPa) | largest force error (eV/A) "
             "| rank corr. Bayesian vs actual | top-quartile precision |", "|---" * 8 + "|"]
    for a in sets:
        c = a.get("calibration") or {}
        lines.append(f"| {a['name']} | {a['frames']} | {_fmt(a['rmse_energy_mev'], '.3f')} | "
                     f"{_fmt(a['rmse_forces'], '.4f')} | {_fmt(a['rmse_stress_gpa'], '.4f')} | "
                     f"{_fmt(a['max_force_error'], '.3f')} | {_fmt(c.get('spearman'), '.2f')} | "
                     f"{_fmt(c.get('top_quartile_precision'), '.2f')} |")
    lines += ["", "RMSE over every frame, force component and Voigt stress component; energies relative to each "
              "side's cubic reference (fresh MD sets: the oracle's own cubic cell; files: as given). Top-quartile "
              "precision: the share of the quarter of frames with the largest Bayesian error whose actual error is "
              "above the median (0.5: no information).", ""]
    for a in sets:
        lines += [f"### {a['name']}", "", f"Source: {a['source']}; {a['frames']} frames"
                  + (f", {len(a['skipped'])} left out (see results.json)" if a["skipped"] else "") + "; oracle - model "
                  f"offset of the cubic reference {_fmt(a['energy_offset_mev'], '.2f')} meV/cell.", "",
                  " ".join(f"![{f}]({f})" for f in a["figures"]), ""]
        lines += calibration_lines(a.get("calibration") or {})
    for what, err in (data.get("failed") or {}).items():
        lines += [f"**held-out set {what} FAILED**: {err}", ""]
    return lines


SECTIONS = {"ground_state": _section_ground_state, "metastable": _section_metastable, "phonons": _section_phonons,
            "transport": _section_transport, "transitions": _section_transitions,
            "double_well": _section_double_well, "accuracy": _section_accuracy}


def oracle_from_args(spec: Optional[str], options: dict):
    if spec is None:
        return None
    from ..oracles import make_oracle
    return make_oracle(spec, options)
