"""Labelling workers: claim frames from the store, call the oracle, check the label, store it or record the failure.

A label is accepted only after its own checks (energy, forces and stress present and finite, no force above
``LabelChecks.max_force``); anything else is a failed attempt with the reason (the store retries it up to its
limit).  ``run_workers_mpi`` runs one worker per MPI rank (``mpiexec -n K sp-server label STORE ...``); every
rank works on its own claims, rank 0 gathers the counts.  Each oracle call may itself be parallel (ABINIT's
``ranks`` option: K label workers x ranks MPI processes in all).
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from ..store import Store


@dataclass
class LabelChecks:
    max_force: float = 50.0      # eV/A: a larger force means a broken calculation or an absurd structure
    need_stress: bool = True     # the fit and NPT need the stress: a label without it is refused


@dataclass
class LabelCounts:
    labeled: int = 0
    failed: int = 0
    reasons: list = field(default_factory=list)  # (frame id, reason)

    def merge(self, other: "LabelCounts"):
        self.labeled += other.labeled
        self.failed += other.failed
        self.reasons += other.reasons


def owner_name(tag: str = "label") -> str:
    """Claims carry host:pid:tag, so a restarted run can tell its own dead claims from live ones."""
    return f"{socket.gethostname()}:{os.getpid()}:{tag}"


def label_one(atoms, calc, checks: LabelChecks = LabelChecks()) -> tuple:
    """(energy eV, forces eV/A, stress eV/A^3 Voigt) of one structure; raises ValueError/any oracle error."""
    a = atoms.copy()
    if hasattr(calc, "reset"):  # nothing cached from an earlier (perhaps failed) call may leak into this label
        calc.reset()
    a.calc = calc
    energy = float(a.get_potential_energy())
    forces = np.asarray(a.get_forces(), dtype=float)
    try:
        stress = np.asarray(a.get_stress(), dtype=float).reshape(-1)
    except Exception as exc:
        if checks.need_stress:
            raise ValueError(f"the oracle gave no stress ({type(exc).__name__}: {exc})") from None
        stress = np.full(6, np.nan)
    if forces.shape != (len(a), 3):
        raise ValueError(f"forces of shape {forces.shape} for {len(a)} atoms")
    if not (np.isfinite(energy) and np.all(np.isfinite(forces))):
        raise ValueError("non-finite energy or forces")
    if checks.need_stress and not np.all(np.isfinite(stress)):
        raise ValueError("non-finite stress")
    fmax = float(np.max(np.linalg.norm(forces, axis=1))) if len(a) else 0.0
    if fmax > checks.max_force:
        raise ValueError(f"largest force {fmax:.1f} eV/A above the accepted {checks.max_force} eV/A")
    return energy, forces, stress


def run_worker(store: Store, calc, *, owner: Optional[str] = None, checks: LabelChecks = LabelChecks(),
               batch: int = 1, lease_seconds: float = 3600.0, max_frames: Optional[int] = None,
               progress: bool = False, log: Callable = print, on_label: Optional[Callable] = None) -> LabelCounts:
    """Label pending frames until none is left (or ``max_frames`` were handled); returns the counts."""
    owner = owner or owner_name()
    counts = LabelCounts()
    bar = tqdm(total=store.counts()["pending"], desc=f"labelling ({owner})", unit="frame", disable=not progress,
               file=sys.stderr)
    handled = 0
    try:
        while max_frames is None or handled < max_frames:
            n = batch if max_frames is None else min(batch, max_frames - handled)
            claimed = store.claim(owner, n=n, lease_seconds=lease_seconds)
            if not claimed and store.release_dead_claims():   # a worker of this host died mid-call: its claims
                claimed = store.claim(owner, n=n, lease_seconds=lease_seconds)   # go back, the others go on
            if not claimed:
                break
            for frame_id, atoms in claimed:
                t0 = time.perf_counter()
                try:
                    energy, forces, stress = label_one(atoms, calc, checks)
                except Exception as exc:  # an oracle failure is a failed label, never a crash of the worker
                    reason = f"{type(exc).__name__}: {exc}"
                    state = store.fail(frame_id, owner, reason)
                    counts.failed += 1
                    counts.reasons.append((frame_id, reason))
                    log(f"frame {frame_id}: label failed ({reason}); now {state}")
                else:
                    if store.complete(frame_id, owner, energy, forces, stress,
                                      label_seconds=time.perf_counter() - t0):
                        counts.labeled += 1
                        if on_label is not None:
                            on_label(frame_id)
                    else:
                        log(f"frame {frame_id}: our claim expired before the label was stored; it was not written")
                handled += 1
                bar.update()
    finally:
        bar.close()
    return counts


def run_workers_mpi(store_url: str, make_calc: Callable, *, checks: LabelChecks = LabelChecks(), batch: int = 1,
                    lease_seconds: float = 3600.0, max_attempts: int = 3, progress: bool = True,
                    log: Callable = print) -> Optional[LabelCounts]:
    """One worker per MPI rank (mpi4py; a plain run is one rank).  Returns the summed counts on rank 0, None on
    the other ranks."""
    try:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
    except ImportError:
        comm, rank, size = None, 0, 1
    store = Store(store_url, max_attempts=max_attempts)
    if rank == 0:
        log(f"labelling {store_url}: {store.counts()['pending']} pending frame(s), {size} worker(s)")
    try:
        calc = make_calc()
        counts = run_worker(store, calc, owner=owner_name(f"rank{rank}"), checks=checks, batch=batch,
                            lease_seconds=lease_seconds, progress=progress and rank == 0,
                            log=lambda m: log(f"[rank {rank}] {m}"))
    except Exception as exc:  # e.g. the oracle cannot be built on this rank: report it, do not hang the others
        log(f"[rank {rank}] worker stopped: {type(exc).__name__}: {exc}")
        counts = LabelCounts(reasons=[(-1, f"rank {rank}: {exc}")])
    if comm is None or size == 1:
        return counts
    gathered = comm.gather(counts, root=0)
    if rank != 0:
        return None
    total = LabelCounts()
    for c in gathered:
        total.merge(c)
    return total
