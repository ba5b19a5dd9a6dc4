"""Socket oracle: any i-PI protocol client (LAMMPS fix ipi, CP2K, Quantum ESPRESSO pw.x --ipi, i-PI's drivers,
``sp-server serve``) labels structures; we play the part of i-PI (the server side of the socket).

Built on ASE's :class:`~ase.calculators.socketio.SocketIOCalculator`.  The client either is started by the user
(it connects to ``/tmp/ipi_NAME`` or HOST:PORT) or is launched by us from ``command`` ("{unixsocket}" and "{port}"
are filled in).  The protocol carries positions and cell only (Angstrom here, bohr on the wire, converted by
ASE): every structure sent to one client must have the same atoms in the same order.  A dead or silent client
raises OracleError after ``timeout`` seconds instead of waiting forever.
"""
from __future__ import annotations

import shlex
import subprocess
import time
from typing import Optional

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.socketio import SocketIOCalculator

from ..fit.harmonic import OracleError
from ..processes import stop_process


class _Watch:
    """What ASE's socket server polls while it waits for the client (its ``proc``): fails once ``timeout`` seconds
    pass without a connection, or when the launched client process has exited; ``wait`` never blocks for long."""

    def __init__(self, process: Optional[subprocess.Popen], timeout: float, where: str):
        self.process, self.deadline, self.timeout, self.where = process, time.monotonic() + timeout, timeout, where

    def poll(self):
        if self.process is not None and self.process.poll() is not None:
            return self.process.returncode
        if time.monotonic() > self.deadline:
            raise OracleError(f"no i-PI client connected to {self.where} within {self.timeout:g} s")
        return None

    def wait(self):
        if self.process is None:
            return 0
        try:
            return self.process.wait(10)
        except subprocess.TimeoutExpired:
            return stop_process(self.process, 10)


class _SocketIO(SocketIOCalculator):
    """ASE's socket calculator, reading the client's virial the way i-PI does.

    i-PI keeps the cell upper triangular (columns = lattice vectors) and uses only the upper triangle of the
    virial; LAMMPS ``fix ipi`` therefore sends the upper triangle alone (zeros below).  ASE receives the matrix
    transposed and symmetrises it, which halves every shear component of such a client (checked against LAMMPS's
    own pressure: tests/oracles/test_socket.py).  The meaningful triangle (lower in ASE's transposed frame) is
    mirrored instead; a client sending the full symmetric virial is unaffected."""

    def launch_server(self):
        server = super().launch_server()
        receive = server.calculate

        def calculate(atoms):
            results = receive(atoms)
            v = np.asarray(results["virial"], dtype=float)
            results["virial"] = np.tril(v) + np.tril(v, -1).T
            return results
        server.calculate = calculate
        return server


class SocketOracle(Calculator):
    """energy (eV), forces (eV/A), stress (eV/A^3, ASE sign) from an i-PI protocol client."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, unixsocket: Optional[str] = None, port: Optional[int] = None, command: Optional[str] = None,
                 timeout: float = 600.0, cwd: Optional[str] = None):
        super().__init__()
        if (unixsocket is None) == (port is None):
            raise ValueError("socket oracle: give exactly one of unixsocket (name, /tmp/ipi_NAME) or port")
        if unixsocket is not None and len(f"/tmp/ipi_{unixsocket}") > 107:
            raise ValueError(f"socket oracle: /tmp/ipi_{unixsocket} is longer than the 107 characters AF_UNIX allows")
        self.unixsocket, self.port, self.command, self.timeout, self.cwd = unixsocket, port, command, timeout, cwd
        self._io: Optional[SocketIOCalculator] = None
        self._signature = None
        self.process: Optional[subprocess.Popen] = None

    def _launch(self, atoms, properties, port, unixsocket):
        cmd = self.command.format(unixsocket=unixsocket or "", port=port or "")
        self.process = subprocess.Popen(shlex.split(cmd), cwd=self.cwd)
        return _Watch(self.process, self.timeout, self._where())

    def _where(self) -> str:
        return f"/tmp/ipi_{self.unixsocket}" if self.unixsocket else f"port {self.port}"

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        signature = (len(self.atoms), tuple(self.atoms.numbers))
        if self._signature is not None and signature != self._signature:
            raise OracleError(f"socket oracle at {self._where()}: the client serves {self._signature[0]} atoms in a "
                              f"fixed order; got a structure with {signature[0]} atoms or other species")
        if self._io is None:
            kw = {"launch_client": self._launch} if self.command else {}
            try:
                self._io = _SocketIO(port=self.port, unixsocket=self.unixsocket, timeout=self.timeout, **kw)
            except OSError as exc:   # address in use, no permission
                raise OracleError(f"socket oracle at {self._where()}: cannot listen: {exc}") from None
            if self._io.server is not None:   # no command: the server waits for a client the user starts
                self._io.server.proc = _Watch(None, self.timeout, self._where())
            self._signature = signature
        a = self.atoms.copy()
        try:
            a.calc = self._io
            energy = a.get_potential_energy()
            forces = a.get_forces()
            stress = a.get_stress()
        except Exception as exc:  # socket timeout, closed connection, protocol error
            self.close()
            raise OracleError(f"socket oracle at {self._where()}: {type(exc).__name__}: {exc}") from None
        if not (np.isfinite(energy) and np.all(np.isfinite(forces)) and np.all(np.isfinite(stress))):
            raise OracleError(f"socket oracle at {self._where()}: non-finite energy, forces or stress")
        self.results = {"energy": float(energy), "free_energy": float(energy), "forces": forces, "stress": stress}

    def close(self):
        if self._io is not None:
            try:
                self._io.close()
            except Exception:
                pass
            self._io = None
        stop_process(self.process, 10)
        self._signature = None


def make_socket_oracle(unixsocket: Optional[str] = None, port: Optional[int] = None, command: Optional[str] = None,
                       timeout: float = 600.0, cwd: Optional[str] = None) -> SocketOracle:
    """The socket oracle (see the module docstring); ``timeout`` in seconds."""
    return SocketOracle(unixsocket=unixsocket, port=port, command=command, timeout=timeout, cwd=cwd)
