"""The report of an on-the-fly run: figures like the paper's Fig. 1 (Bayesian error along each MD, largest error per
iteration) and Fig. 2 (model vs oracle parity), the training-set growth, a markdown summary and CSV numbers.

Reads only the run folder (state.json, md/*/traces, store.db, model.h5); can be re-run at any time
(``sp-server otf CONFIG --report``).  Units: eV, meV per reference cell, eV/A, GPa.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..figures import plt, save
from ..io.jsonfile import atomic_path, write_bytes, write_json
from ..model.native import load_model
from ..model.posterior import ErrorThreshold
from ..potential import Evaluator
from ..server.driver import read_trace
from ..store import Store
from ..units import GPA_EV_A3
from .config import OtfConfig

PHASE_COLORS = {"R": "tab:red", "O": "tab:green", "T": "tab:blue", "C": "tab:gray"}
VOIGT = ("xx", "yy", "zz", "yz", "xz", "xy")


def _traces(run: Path, history: list) -> list:
    """[(record, phase, errors array of the threshold quantity)] for every MD of the history, in order."""
    out = []
    for rec in history:
        folder = run / "md" / rec["key"]
        if rec["key"] == "initial" or not (folder / "traces").exists():
            continue
        phases = list((rec.get("md_status") or {}).keys())
        for k, phase in enumerate(phases):
            trace = folder / "traces" / f"trace_{k}.csv"
            if not trace.exists():
                continue
            out.append((rec, phase, read_trace(trace)))
    return out


def _fig_errors(run: Path, history: list, quantity: str, threshold: float, report: Path):
    traces = _traces(run, history)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    offset = 0
    seen = set()
    for rec in history:
        if rec["key"] == "initial":
            continue
        length = 0
        for r, phase, data in traces:
            if r is not rec or data.size == 0:
                continue
            y = data[f"err_{quantity}"]
            x = offset + np.arange(len(y))
            ax1.plot(x, y, lw=0.6, color=PHASE_COLORS.get(phase, "k"), label=None if phase in seen else phase)
            seen.add(phase)
            offset += len(y)
            length += len(y)
        if length:
            ax1.axvline(offset, color="0.8", lw=0.5)
            ax1.text(offset - length / 2, 1.02, f"{rec['temperature']:g}K", transform=ax1.get_xaxis_transform(),
                     ha="center", fontsize=6, rotation=90)
    ax1.axhline(threshold, color="k", ls="--", lw=0.8, label=f"threshold {threshold:g}")
    ax1.set_yscale("log")
    ax1.set_xlabel("MD frame (all runs, in order)")
    ax1.set_ylabel(f"Bayesian error {quantity}")
    ax1.legend(fontsize=7, loc="upper left")
    ax1.set_title("Bayesian error along each MD (R, O, T starts)", fontsize=9)
    recs = [r for r in history if r["key"] != "initial" and r.get("max_error") is not None]
    if recs:
        ax2.plot(range(1, len(recs) + 1), [r["max_error"] for r in recs], "o-", ms=3)
        for i, r in enumerate(recs):
            ax2.annotate(f"{r['temperature']:g}", (i + 1, r["max_error"]), fontsize=6, xytext=(0, 4),
                         textcoords="offset points", ha="center")
    ax2.axhline(threshold, color="k", ls="--", lw=0.8)
    ax2.set_yscale("log")
    ax2.set_xlabel("iteration (label: temperature, K)")
    ax2.set_ylabel(f"largest {quantity} of the iteration")
    ax2.set_title("largest Bayesian error per iteration", fontsize=9)
    return save(fig, report / "fig1_bayesian_error.png")


def parity_data(store: Store, model, log=None, errors: bool = False, **filters) -> dict:
    """Model and oracle values of every labelled frame (or those matching ``filters``, e.g. role="validation"),
    by role: energy (meV/cell, relative to the reference), forces (eV/A), stress (GPa, Voigt).  With ``errors``
    (a model with a posterior): per frame also "bayes_force" (largest Bayesian force-component std) and
    "actual_force" (largest |dF| component), eV/A.  A frame the model cannot map is left out (and named to
    ``log`` when given)."""
    ev = Evaluator(model)
    errors = errors and model.posterior is not None
    out = {}
    for row in store.rows(state="labeled", **filters):
        role = row.get("role", "train")
        try:
            e, f, s, res = frame_pairs(ev, row.toatoms(), errors=errors)
        except ValueError as exc:
            if log is not None:
                log(f"  {role} frame id={row.id}: {exc}")
            continue
        d = out.setdefault(role, {"energy": [], "forces": [], "stress": [], "temperature": [], "origin": [],
                                  "bayes_force": [], "actual_force": []})
        d["bayes_force"].append(float(res.errors["force_max"]) if errors else np.nan)
        d["actual_force"].append(float(np.abs(f[:, 1] - f[:, 0]).max()))
        d["origin"].append(str(row.get("origin", "")))
        d["energy"].append(e)
        d["forces"].append(f)
        d["stress"].append(s)
        d["temperature"].append(float(row.get("temperature", 0.0)))
    for d in out.values():
        d["energy"] = np.array(d["energy"]).reshape(-1, 2)
        d["forces_by_frame"] = d["forces"]
        d["forces"] = np.concatenate(d["forces"]) if d["forces"] else np.zeros((0, 2))
        d["stress"] = np.array(d["stress"]).reshape(-1, 6, 2)
        d["temperature"] = np.array(d["temperature"])
        d["origin"] = np.array(d["origin"])
        d["bayes_force"] = np.array(d["bayes_force"])
        d["actual_force"] = np.array(d["actual_force"])
    return out


def frame_pairs(ev: Evaluator, atoms, oracle_reference: float | None = None, errors: bool = False):
    """Oracle and model values of one labelled frame (energy, forces; stress when the label has it), each as
    pairs (oracle, model): energy (2,) meV per reference cell relative to the reference energy (the oracle's side
    relative to ``oracle_reference``, eV per cell, when given), forces (3N, 2) eV/A, stress (6, 2) GPa or None.
    Returns (energy, forces, stress, the model's FrameResult); ValueError when the model cannot map the frame."""
    from ase.calculators.calculator import PropertyNotImplementedError
    res = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers, errors=errors)
    ref = ev.model.reference.energy
    oref = ref if oracle_reference is None else float(oracle_reference)
    ncell = len(atoms) / ev.model.natoms
    energy = np.array([1000 * (atoms.get_potential_energy() / ncell - oref), 1000 * (res.energy / ncell - ref)])
    forces = np.stack([np.asarray(atoms.get_forces()).ravel(), res.forces.ravel()], axis=1)
    try:
        stress = np.stack([np.asarray(atoms.get_stress()), res.stress], axis=1) / GPA_EV_A3
    except PropertyNotImplementedError:
        stress = None
    return energy, forces, stress, res


def rmse(pairs: np.ndarray) -> float:
    pairs = np.asarray(pairs)
    return float(np.sqrt(np.mean((pairs[..., 1] - pairs[..., 0]) ** 2))) if pairs.size else float("nan")


def calibration(bayesian, actual, threshold: Optional[float] = None) -> dict:
    """Does the Bayesian error say where the model is wrong?  Per frame: ``bayesian`` the predicted largest
    force-component std and ``actual`` the largest |F_model - F_oracle| component (eV/A).

    spearman: rank correlation of the two (1: the Bayesian error orders the frames exactly as the real one);
    ratio_median: median of actual / Bayesian (the factor a calibrated threshold divides by);
    top_quartile_precision: share of the frames in the top quarter of Bayesian error whose actual error is above
    the median actual error (0.5 for a Bayesian error that knows nothing, 1 for a perfect one);
    with ``threshold`` (eV/A on the Bayesian error): flagged, and flagged_precision, the same share among them."""
    from scipy.stats import spearmanr
    b = np.asarray(bayesian, dtype=float)
    a = np.asarray(actual, dtype=float)
    ok = np.isfinite(b) & np.isfinite(a)
    b, a = b[ok], a[ok]
    out = {"n": int(len(b))}
    if len(b) < 4 or np.all(b == b[0]):
        return out
    med = float(np.median(a))
    top = b >= np.quantile(b, 0.75)
    out.update(spearman=float(spearmanr(b, a).statistic), ratio_median=float(np.median(a / np.maximum(b, 1e-300))),
               top_quartile_precision=float(np.mean(a[top] > med)))
    if threshold is not None:
        flagged = b > threshold
        out.update(threshold=float(threshold), flagged=int(flagged.sum()),
                   flagged_precision=float(np.mean(a[flagged] > med)) if flagged.any() else None)
    return out


def calibration_lines(c: dict) -> list:
    """Markdown lines on how well the Bayesian force error ranks the real one (validate.accuracy.calibration)."""
    if "spearman" not in c:
        return ["Bayesian errors: not enough frames (or no posterior) to say how they rank the real errors.", ""]
    out = [f"Bayesian vs actual largest force error over {c['n']} frames: rank correlation {c['spearman']:.2f}; "
           f"of the quarter with the largest Bayesian error, {100 * c['top_quartile_precision']:.0f}% have an actual "
           f"error above the median (50%: no information); actual/Bayesian median ratio "
           f"{c['ratio_median']:.3g}."]
    if c.get("threshold") is not None:
        prec = c.get("flagged_precision")
        out.append(f"Threshold {c['threshold']:g} eV/A flags {c['flagged']} frame(s)"
                   + (f", {100 * prec:.0f}% of them above the median actual error." if prec is not None else "."))
    return out + [""]


def plot_parity(data: dict, path, title: str = "model vs oracle (validation frames were never trained on)") -> Path:
    """Parity panels (energy, forces, six stress components) of ``data`` (:func:`parity_data`'s layout: role ->
    pairs (oracle, model)), one colour per role, RMSE in each panel."""
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.8))
    panels = [("energy", "energy (meV/cell)", None), ("forces", "forces (eV/A)", None)]
    panels += [("stress", f"stress {v} (GPa)", i) for i, v in enumerate(VOIGT)]
    styles = {"train": dict(color="tab:blue", s=6, alpha=0.5), "validation": dict(color="tab:red", s=9, alpha=0.8)}
    for ax, (key, title, comp) in zip(axes.ravel(), panels):
        text = []
        for role in ("train", "validation"):
            if role not in data:
                continue
            pairs = data[role][key] if comp is None else data[role][key][:, comp, :]
            if not pairs.size:
                continue
            ax.scatter(pairs[:, 0], pairs[:, 1], label=role, **styles[role])
            text.append(f"{role} RMSE {rmse(pairs):.3g}")
        lims = ax.get_xlim() + ax.get_ylim()
        lo, hi = min(lims), max(lims)
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("oracle", fontsize=8)
        ax.set_ylabel("model", fontsize=8)
        ax.text(0.03, 0.97, "\n".join(text), transform=ax.transAxes, va="top", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


def _short_label(r: dict) -> str:
    """'15K/2' for an iteration; the MD cell is added when the key names one ('300K 4x4x4/1')."""
    if r["key"] == "initial":
        return "init"
    parts = r["key"].split("_")
    cell = f" {parts[1]}" if len(parts) == 3 else ""
    return f"{r['temperature']:g}K{cell}/{r['iteration']}"


def _fig_growth(history: list, report: Path):
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    x = np.arange(len(history))
    ax.plot(x, [r["n_train"] for r in history], "o-", ms=3, label="training structures")
    ax.plot(x, [r.get("oracle_calls", np.nan) for r in history], "s--", ms=3, label="oracle calls (all)")
    ax.set_xticks(x)
    ax.set_xticklabels([_short_label(r) for r in history], rotation=70, fontsize=6)
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    ax.set_title("training-set growth", fontsize=9)
    return save(fig, report / "training_set_growth.png")


def write_report(run, held_out_temperature: float | None = None) -> Path:
    """Write run/report/: figures, iterations.csv, parity.json and summary.md; returns the folder."""
    run = Path(run)
    report = run / "report"
    report.mkdir(exist_ok=True)
    with open(run / "state.json") as fh:
        state = json.load(fh)
    history = state["history"]
    cfg = OtfConfig.load(run / "config.toml") if (run / "config.toml").exists() else OtfConfig()
    thr = ErrorThreshold.parse(cfg.loop.threshold)
    model = load_model(run / "model.h5")
    store = Store(run / "store.db")
    figs = [_fig_errors(run, history, thr.quantity, thr.value, report)]
    data = parity_data(store, model, errors=True)
    figs.append(plot_parity(data, report / "fig2_parity.png"))
    figs.append(_fig_growth(history, report))
    with atomic_path(report / "iterations.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "temperature_K", "iteration", "flagged", "labelled", "max_error", "n_train",
                    "oracle_calls", "md_steps_total", "model_version", "val_energy_mev_per_cell", "val_forces_ev_a",
                    "val_stress_gpa", "n_validation"])
        for r in history:
            v = r.get("rmse_validation") or {}
            w.writerow([r["key"], r.get("temperature", ""), r.get("iteration", ""), r.get("flagged", ""),
                        r.get("selected", ""), r.get("max_error", ""), r["n_train"], r.get("oracle_calls", ""),
                        r.get("md_steps_total", ""), r["model_version"], v.get("energy_mev_per_cell", ""),
                        v.get("forces", ""), v.get("stress_gpa", ""), v.get("n", 0)])
    # held-out accuracy: validation frames of the highest temperature (or the one asked for)
    summary = {"model_version": state["model_version"], "oracle_calls": state.get("oracle_calls"),
               "md_steps": state.get("md_steps"), "wall_s": state.get("wall_s"),
               "n_train": history[-1]["n_train"] if history else 0,
               "final_max_error": next((r["max_error"] for r in reversed(history) if r.get("max_error") is not None),
                                       None), "threshold": cfg.loop.threshold}
    val = data.get("validation")
    threshold = thr.value if thr.quantity == "force_max" else None
    if val is not None and len(val["energy"]):
        temps = val["temperature"]
        t_held = held_out_temperature if held_out_temperature is not None else float(temps.max())
        sel = np.isclose(temps, t_held)
        holdout = sel & (val["origin"] == "holdout")
        if holdout.any():   # the final held-out set (loop holdout stage); else every validation frame at t_held
            sel = holdout
        summary["held_out"] = {
            "temperature_K": t_held, "n_frames": int(sel.sum()), "final_set": bool(holdout.any()),
            "energy_mev_per_cell": rmse(val["energy"][sel]),
            "forces_ev_a": rmse(np.concatenate([f for f, s in zip(val["forces_by_frame"], sel) if s])),
            "stress_gpa": rmse(val["stress"][sel]),
            "calibration": calibration(val["bayes_force"][sel], val["actual_force"][sel], threshold)}
        summary["validation_all"] = {"n_frames": int(len(temps)), "energy_mev_per_cell": rmse(val["energy"]),
                                     "forces_ev_a": rmse(val["forces"]), "stress_gpa": rmse(val["stress"]),
                                     "calibration": calibration(val["bayes_force"], val["actual_force"], threshold)}
    write_json(report / "summary.json", summary)
    lines = ["# On-the-fly run report", "", f"run folder: `{run}`", "",
             f"- final model: `model.h5` version {summary['model_version']}",
             f"- oracle calls: {summary['oracle_calls']}, MD steps: {summary['md_steps']}, "
             f"wall time: {summary['wall_s'] or 0:.0f} s",
             f"- training structures: {summary['n_train']}; threshold {cfg.loop.threshold}; "
             f"largest Bayesian error in the last MD: {summary['final_max_error']}", ""]
    if "held_out" in summary:
        h = summary["held_out"]
        lines += [f"Held-out RMSE ({h['n_frames']} frames of the {'final ' if h['final_set'] else ''}"
                  f"{h['temperature_K']:g} K MD, labelled by the oracle, "
                  f"never trained on): energy {h['energy_mev_per_cell']:.3f} meV/cell, forces "
                  f"{h['forces_ev_a']:.4f} eV/A, stress {h['stress_gpa']:.4f} GPa", ""]
    if "validation_all" in summary:
        lines += ["Does the Bayesian error point at the real errors?  Over every validation frame of the run:"]
        lines += calibration_lines(summary["validation_all"]["calibration"])
    lines += ["| iteration | T (K) | flagged | labelled | max error | train | val E (meV/cell) | val F (eV/A) | "
              "val S (GPa) |", "|---|---|---|---|---|---|---|---|---|"]
    def fmt(x, f):
        return format(x, f) if isinstance(x, (int, float)) else "-"
    for r in history:
        v = r.get("rmse_validation") or {}
        lines.append(f"| {r['key']} | {fmt(r.get('temperature'), 'g')} | {fmt(r.get('flagged'), 'd')} | "
                     f"{fmt(r.get('selected'), 'd')} | {fmt(r.get('max_error'), '.3g')} | {r['n_train']} | "
                     f"{fmt(v.get('energy_mev_per_cell'), '.3f')} | {fmt(v.get('forces'), '.4f')} | "
                     f"{fmt(v.get('stress_gpa'), '.4f')} |")
    lines += ["", "Figures:"] + [f"- ![{p.stem}]({p.name})" for p in figs]
    # written last: its presence says the report is complete (a run that is done rewrites a report without it)
    write_bytes(report / "summary.md", ("\n".join(lines) + "\n").encode())
    return report
