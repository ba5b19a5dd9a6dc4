"""`sp-server validate`: run the validation items for a model (and its oracle, side by side) into a report folder:
summary.md (tables), results.json (every number), CSV and PNG per figure.

Items so far: ``ground_state`` (Table 1: relaxed R, and any other phases asked for), ``double_well`` (Fig. 7) and
``phonons`` (Fig. 4: dispersions of the cubic reference and of each relaxed phase).
Units: A, degrees, A^3 per cell, meV per cell relative to the cubic reference of the same calculator, C/m^2.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..figures import plt, save
from ..model.native import load_model
from .ground_state import double_well, ground_state, model_calculator

ITEMS = ("ground_state", "double_well", "phonons")


def run_validation(model_path, outdir, *, oracle=None, oracle_name: str = "oracle", items=ITEMS,
                   phases=("R",), log=print) -> dict:
    """Run ``items`` for the model file ``model_path`` and, when ``oracle`` (an ASE calculator) is given, for the
    oracle too; writes ``outdir`` and returns the results."""
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        raise ValueError(f"unknown validation item(s) {unknown}: choose among {list(ITEMS)}")
    model = load_model(model_path)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    calcs = {"model": model_calculator(model)}
    if oracle is not None:
        oracle_name = oracle_name if oracle_name != "model" else "oracle:model"   # a model file as the oracle
        calcs[oracle_name] = oracle
    results: dict = {"model": str(model_path), "oracle": oracle_name if oracle is not None else None}
    gs: dict = {}
    if set(items) & {"ground_state", "double_well", "phonons"}:
        for phase in (phases if set(items) & {"ground_state", "phonons"} else ("R",)):
            for name, calc in calcs.items():
                t0 = time.monotonic()
                g = ground_state(model, calc, name, phase)
                gs.setdefault(phase, {})[name] = g
                log(f"ground state {phase} with {name}: a {g.a:.4f} A, alpha {g.alpha:.3f} deg, E - E_cubic "
                    f"{g.energy_mev:.2f} meV/cell, |P| {g.polarization_norm:.3f} C/m^2 ({g.steps} steps, "
                    f"{time.monotonic() - t0:.1f} s{'' if g.converged else ', NOT converged'})")
        if "ground_state" in items:
            results["ground_state"] = {ph: {n: g.as_dict() for n, g in d.items()} for ph, d in gs.items()}
    if "double_well" in items:
        pattern = gs["R"]["model"].displacements
        dw = double_well(model, calcs, pattern)
        results["double_well"] = dw.as_dict()
        _plot_double_well(dw, out / "double_well.png")
        with open(out / "double_well.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["amplitude"] + [f"{n}_meV_per_cell" for n in dw.energies])
            for k, a in enumerate(dw.amplitudes):
                w.writerow([a] + [dw.energies[n][k] for n in dw.energies])
        log(f"double well: depth {min(dw.energies['model']):.2f} meV/cell (model)"
            + "".join(f", {min(v):.2f} ({n})" for n, v in dw.energies.items() if n != "model"))
    if "phonons" in items:
        results["phonons"] = _phonons(model, calcs, gs, out, log)
    with open(out / "results.json", "w") as fh:
        json.dump(results, fh, indent=1)
    (out / "summary.md").write_text(_summary(results))
    log(f"validation report in {out.resolve()}: summary.md, results.json"
        + (", double_well.png/.csv" if "double_well" in items else ""))
    return results


def _phonons(model, calcs: dict, gs: dict, out: Path, log) -> dict:
    """Dispersions of the cubic reference (each calculator at the model's reference cell) and of each relaxed
    phase (each calculator at its own relaxed structure); PNG per phase, differences to the model."""
    from .phonons import compare, dispersion
    structures = {"C": {n: model.supercell((1, 1, 1)) for n in calcs}}
    structures.update({ph: {n: g.structure for n, g in by.items()} for ph, by in gs.items()})
    res = {}
    for phase, by in structures.items():
        t0 = time.monotonic()
        disp = {n: dispersion(atoms, calcs[n], n, phase) for n, atoms in by.items()}
        entry = {"dispersions": {n: d.as_dict() for n, d in disp.items()}}
        others = [n for n in disp if n != "model"]
        entry["differences"] = {n: compare(disp["model"], disp[n]) for n in others}
        res[phase] = entry
        _plot_dispersion(disp, phase, out / f"phonons_{phase}.png")
        log(f"phonons {phase}: lowest model frequency {np.min(disp['model'].frequencies):.2f} THz"
            + "".join(f"; vs {n}: RMS {d['rms_thz']:.3f} THz, max {d['max_thz']:.3f} THz"
                      for n, d in entry["differences"].items()) + f" ({time.monotonic() - t0:.1f} s)")
    return res


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


def _fmt(x, f=".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, f)


def _summary(results: dict) -> str:
    lines = ["# Validation report", "", f"model: `{results['model']}`; oracle: {results['oracle'] or '-'}", ""]
    for phase, by in results.get("ground_state", {}).items():
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
    for phase, entry in results.get("phonons", {}).items():
        lines += [f"## Phonons, {phase} (Fig. 4)", "", f"![phonons {phase}](phonons_{phase}.png)", ""]
        for n, d in entry["differences"].items():
            lines.append(f"- model vs {n}: RMS {d['rms_thz']:.3f} THz, max {d['max_thz']:.3f} THz; lowest "
                         f"frequency {d['lowest_model_thz']:.2f} (model) vs {d['lowest_other_thz']:.2f} THz")
        lines.append("")
    if "double_well" in results:
        dw = results["double_well"]
        lines += ["## Double well (Fig. 7)", "", "![double well](double_well.png)", "",
                  "| calculator | depth (meV/cell) | at amplitude |", "|---|---|---|"]
        for n, e in dw["energies"].items():
            k = int(np.argmin(e))
            lines.append(f"| {n} | {e[k]:.2f} | {dw['amplitudes'][k]:.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def oracle_from_args(spec: Optional[str], options: dict):
    if spec is None:
        return None
    from ..oracles import make_oracle
    return make_oracle(spec, options)
