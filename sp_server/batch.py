"""Batch evaluation of structure files (anything ase.io reads, or an ase.db) into extended XYZ.

Each structure is evaluated independently: one that cannot be read or mapped is reported by file and frame and
skipped, and the others are still written (appended frame by frame, so an interruption keeps what was done).
Output units: energy eV, forces eV/A, stress eV/A^3 (ASE sign and Voigt order); with a model that carries a
posterior, each frame also gets its Bayesian errors: sp_err_energy_mev_per_cell (meV per reference cell),
sp_err_force_max (eV/A), sp_err_stress_max_gpa (GPa), sp_err_local_energy_max_mev (meV; the largest error of
one reference cell's energy).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import ase.db
import ase.io
from ase.calculators.singlepoint import SinglePointCalculator
from tqdm import tqdm

from .model.model import Model
from .potential import Evaluator
from .server.queue import is_progress_row


@dataclass
class BatchReport:
    evaluated: int = 0
    flagged: int = 0
    errors: list = field(default_factory=list)  # (frame label, message)

    @property
    def failed(self) -> int:
        return len(self.errors)


def iter_structures(path) -> Iterator[tuple[str, object]]:
    """Yield (label, Atoms or Exception) for every structure of ``path``; read errors become items, not crashes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such structure file")
    if path.suffix == ".db":
        with ase.db.connect(path) as db:
            for row in db.select():
                if is_progress_row(row):   # a flag queue's progress row: no atoms
                    continue
                try:
                    yield f"{path}: row id={row.id}", row.toatoms()
                except Exception as exc:  # a broken row must not hide the others
                    yield f"{path}: row id={row.id}", exc
        return
    frames = ase.io.iread(str(path), index=":")
    k = 0
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except Exception as exc:
            yield f"{path}: frame {k}", ValueError(f"cannot read: {exc}; the rest of the file is unreadable")
            return
        yield f"{path}: frame {k}", atoms
        k += 1


def evaluate_file(model: Model, structures, out, *, progress: bool = True, log=sys.stderr,
                  threshold=None) -> BatchReport:
    """Evaluate every structure of ``structures`` with ``model`` and write extended XYZ to ``out``.

    threshold (an ErrorThreshold): frames whose Bayesian error exceeds it get sp_flagged = True."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    evaluator = Evaluator(model)
    report = BatchReport()
    with open(out, "w") as fh:
        for k, (label, item) in enumerate(tqdm(iter_structures(structures), disable=not progress, unit="frame",
                                              desc="eval", file=log)):
            if isinstance(item, Exception):
                report.errors.append((label, str(item)))
                print(f"error: {label}: {item}", file=log)
                continue
            try:
                res = evaluator.evaluate(item.cell.array, item.positions, item.numbers, errors=True)
            except ValueError as exc:
                report.errors.append((label, str(exc)))
                print(f"error: {label}: {exc}", file=log)
                continue
            atoms = item.copy()
            atoms.info.clear()
            atoms.info.update(sp_frame=k, sp_model=model.name, sp_model_version=model.version,
                              sp_max_displacement=res.frame.max_displacement,
                              sp_supercell=" ".join(str(n) for n in res.frame.mesh))
            if res.errors is not None:  # Bayesian errors: meV per reference cell, eV/A, GPa
                atoms.info.update({f"sp_err_{k}": v for k, v in res.errors.items()})
                if threshold is not None:
                    atoms.info["sp_flagged"] = bool(threshold.exceeded(res.errors))
                    report.flagged += atoms.info["sp_flagged"]
            atoms.calc = SinglePointCalculator(atoms, energy=res.energy, free_energy=res.energy,
                                               forces=res.forces, stress=res.stress)
            ase.io.write(fh, atoms, format="extxyz")
            fh.flush()
            report.evaluated += 1
    return report


__all__ = ["BatchReport", "evaluate_file", "iter_structures"]
