"""An oracle in a child process, with a time limit on every call.

A DFT code that hangs, a Python calculator stuck in C code, or one that crashes its interpreter (segfault, OOM
kill) must cost one failed attempt, not the labelling run.  :class:`IsolatedOracle` is an ASE calculator that
builds the real one (``make_oracle(spec, options)``) in a child process of its own session and sends it one
structure at a time over a pipe.  A call that takes longer than ``timeout_s`` kills the child's whole process
group (the calculator and whatever it launched, e.g. mpirun and its ranks) and raises :class:`OracleTimeout`; a
child that dies raises :class:`OracleCrashed`; the next call starts a fresh child.  The child dies with its parent
(PR_SET_PDEATHSIG), so a killed worker leaves no oracle behind.

Units are the wrapped calculator's (ASE's: eV, eV/A, eV/A^3).
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection, Pipe

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from ..processes import die_with_parent

class OracleTimeout(RuntimeError):
    """The oracle call took longer than its limit; the oracle's processes were killed."""


class OracleCrashed(RuntimeError):
    """The oracle's process died during a call."""


def _child(conn, spec, options):
    """The child (``python -m sp_server.oracles.isolated FD``): the calculator, then a call loop on the pipe.  It runs
    in a session of its own (the parent kills the whole group) and dies with its parent."""
    die_with_parent(signal.SIGKILL)
    from ase import Atoms

    from . import make_oracle
    try:
        calc = make_oracle(spec, options)
    except BaseException as exc:  # the parent reports it at the call
        conn.send(("error", f"cannot build oracle {spec!r}: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", ""))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        numbers, positions, cell, pbc = msg
        atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
        if hasattr(calc, "reset"):
            calc.reset()
        atoms.calc = calc
        try:
            out = {"energy": float(atoms.get_potential_energy()),
                   "forces": np.asarray(atoms.get_forces(), dtype=float)}
            try:
                out["stress"] = np.asarray(atoms.get_stress(voigt=True), dtype=float)
            except Exception as exc:  # reported only when the stress is asked for
                out["stress_error"] = f"{type(exc).__name__}: {exc}"
            conn.send(("ok", out))
        except BaseException as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class IsolatedOracle(Calculator):
    """ASE calculator: ``make_oracle(spec, options)`` run in a child process, each call limited to ``timeout_s``
    seconds (None or <= 0: no limit, the child still isolates crashes)."""

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, spec: str, options: dict | None = None, timeout_s: float | None = 3600.0,
                 start_timeout_s: float = 600.0):
        super().__init__()
        self.spec = spec
        self.options = dict(options or {})
        self.timeout_s = float(timeout_s) if timeout_s and timeout_s > 0 else None
        self.start_timeout_s = float(start_timeout_s)
        self.oracle_name = f"{spec} (isolated)"
        self._proc = None
        self._conn = None
        self.restarts = 0
        self._stress_error = None

    # ------------------------------------------------------------------------------------------------ process
    def _start(self):
        parent, child = Pipe(duplex=True)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "sp_server.oracles.isolated", str(child.fileno())], pass_fds=(child.fileno(),),
            start_new_session=True, stdin=subprocess.DEVNULL)
        child.close()
        self._conn = parent
        parent.send_bytes(pickle.dumps((self.spec, self.options)))
        kind, text = self._receive(self.start_timeout_s, "starting")
        if kind != "ready":
            self._kill()
            raise RuntimeError(text)

    def _kill(self):
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # the calculator and everything it launched
            except (ProcessLookupError, PermissionError):
                proc.kill()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def close(self):
        """Stop the child (also done when the object is collected)."""
        if self._proc is not None and self._proc.poll() is None and self._conn is not None:
            try:
                self._conn.send(None)
                self._proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()

    def __del__(self):
        try:
            self._kill()
        except Exception:
            pass

    def _receive(self, timeout, what):
        t0 = time.monotonic()
        while True:
            wait = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
            try:
                ready = self._conn.poll(min(wait, 1.0) if wait is not None else 1.0)
            except (OSError, EOFError):
                ready = True
            if ready:
                try:
                    return self._conn.recv()
                except (EOFError, OSError):
                    raise OracleCrashed(f"the oracle process died while {what} ({self._death()})") from None
            if self._proc is not None and self._proc.poll() is not None:
                raise OracleCrashed(f"the oracle process died while {what} ({self._death()})")
            if timeout is not None and time.monotonic() - t0 >= timeout:
                self._kill()
                raise OracleTimeout(f"oracle {self.spec!r} {what}: no answer after {timeout:g} s; its processes "
                                    "were killed")

    def _death(self) -> str:
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        return f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"

    # ------------------------------------------------------------------------------------------------ ASE
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        Calculator.calculate(self, atoms, properties, system_changes)
        if not system_changes and self._stress_error is not None and "stress" in properties:
            raise PropertyNotImplementedError(self._stress_error)   # this call's answer had none: not a new call
        self._stress_error = None
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                self._kill()
            self._start()
            self.restarts += 1
        a = self.atoms
        self._conn.send((a.numbers.copy(), a.positions.copy(), a.cell.array.copy(), a.pbc.copy()))
        kind, out = self._receive(self.timeout_s, "computing a label")
        if kind != "ok":
            raise RuntimeError(out)
        if "stress" not in out:
            self._stress_error = out.get("stress_error", "no stress")
            if "stress" in properties:
                raise PropertyNotImplementedError(self._stress_error)
        self.results = {k: v for k, v in out.items() if k in ("energy", "forces", "stress")}
        if "energy" in self.results:
            self.results["free_energy"] = self.results["energy"]


if __name__ == "__main__":
    _conn = Connection(int(sys.argv[1]))
    _spec, _options = pickle.loads(_conn.recv_bytes())
    _child(_conn, _spec, _options)
