"""A fault-injecting oracle: wraps another one and fails on purpose, deterministically, the way real DFT runs fail.

For testing a pipeline (harmonic part, labelling workers, the on-the-fly loop) against what clusters do to it::

    [oracle]
    name = "faulty"
    oracle = "chgnet"                         # the oracle that gives the labels when no fault is injected
    faults = ["raise", "nan", "huge", "nostress", "hang", "crash", "none", "none"]
    persistent_every = 7                      # every 7th structure fails at every attempt
    state_dir = "faults"                      # attempt counts, shared by processes and restarts

Each structure (hashed from its species, positions and cell) gets one kind from ``faults``; its first
``repeat`` attempts fail that way, later ones succeed (a flaky node), except for structures whose hash is a multiple
of ``persistent_every``, which always fail.  Kinds: ``raise`` (an exception), ``nan`` (NaN forces), ``huge`` (a
1e4 eV/A force), ``nostress`` (no stress), ``hang`` (sleeps ``hang_s``), ``crash`` (the process kills itself with
SIGKILL), ``none``.  Every call is appended to ``state_dir/calls.log`` (hash, attempt, kind, pid), so tests can
count what was computed.  Other options go to the wrapped oracle.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

KINDS = ("raise", "nan", "huge", "nostress", "hang", "crash", "none")


def structure_hash(atoms) -> int:
    """The structure's fingerprint (sp_server.fit.fingerprint, 1e-6 A) as an integer."""
    from ..fit.fit import fingerprint
    return int(fingerprint(atoms, 6)[:12], 16)


class FaultyOracle(Calculator):
    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, oracle: str = "emt", faults=("raise", "none"), state_dir: str = "faults", repeat: int = 1,
                 persistent_every: int = 0, hang_s: float = 3600.0, **options):
        super().__init__()
        from . import make_oracle
        bad = [k for k in faults if k not in KINDS]
        if bad:
            raise ValueError(f"unknown fault kinds {bad}; known: {list(KINDS)}")
        self.inner = make_oracle(oracle, options)
        self.faults = list(faults) or ["none"]
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.repeat = int(repeat)
        self.persistent_every = int(persistent_every)
        self.hang_s = float(hang_s)
        self.oracle_name = f"faulty {oracle}"
        self._last = None

    def _attempt(self, key: int) -> int:
        """Count this attempt (an append-only file per structure: safe across processes)."""
        path = self.state_dir / f"{key:012x}.attempts"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, b".")
        finally:
            os.close(fd)
        return path.stat().st_size

    def _log(self, key, attempt, kind):
        with open(self.state_dir / "calls.log", "a") as fh:
            fh.write(f"{key:012x} {attempt} {kind} {os.getpid()}\n")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        Calculator.calculate(self, atoms, properties, system_changes)
        key = structure_hash(self.atoms)
        if not system_changes and self._last is not None and self._last[0] == key:
            attempt, kind = self._last[1:]     # ASE asking for one more property of the same call
        else:
            attempt = self._attempt(key)
            kind = self.faults[key % len(self.faults)]
            persistent = self.persistent_every > 0 and key % self.persistent_every == 0 and kind != "none"
            if not persistent and attempt > self.repeat:
                kind = "none"
            self._log(key, attempt, kind)
            self._last = (key, attempt, kind)
        if kind == "raise":
            raise RuntimeError(f"injected fault: the oracle failed (attempt {attempt})")
        if kind == "hang":
            time.sleep(self.hang_s)
        if kind == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        a = self.atoms.copy()
        if hasattr(self.inner, "reset"):
            self.inner.reset()
        a.calc = self.inner
        self.results = {"energy": float(a.get_potential_energy()), "forces": np.array(a.get_forces())}
        self.results["free_energy"] = self.results["energy"]
        if kind == "nan":
            self.results["forces"][0, 0] = np.nan
        elif kind == "huge":
            self.results["forces"][0, 0] = 1.0e4
        if kind == "nostress":
            if "stress" in properties:
                raise PropertyNotImplementedError("injected fault: no stress")
            return
        else:
            self.results["stress"] = np.array(a.get_stress(voigt=True))
