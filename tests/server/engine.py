"""A minimal i-PI-protocol engine for tests: it listens on /tmp/ipi_NAME, accepts drivers and sends them frames
(or deliberately broken messages)."""
import json
import os
import socket
import struct

import numpy as np
from ase.units import Bohr, Hartree


class FakeEngine:
    def __init__(self, name):
        self.path = f"/tmp/ipi_{name}"
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(8)
        self.srv.settimeout(60)

    def accept(self):
        conn, _ = self.srv.accept()
        conn.settimeout(60)
        return Driver(conn)

    def close(self):
        self.srv.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


class Driver:
    """The engine's view of one connected driver."""

    def __init__(self, sock):
        self.sock = sock

    def _recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("driver closed")
            buf += chunk
        return buf

    def header(self, msg):
        self.sock.sendall(msg.ljust(12).encode())

    def status(self):
        self.header("STATUS")
        return self._recv(12).decode().strip()

    def init(self, bead=0):
        self.header("INIT")
        self.sock.sendall(struct.pack("i", bead) + struct.pack("i", 0))

    def posdata(self, cell_rows_a, positions_a, natoms=None):
        h = np.asarray(cell_rows_a).T / Bohr  # columns are lattice vectors
        self.header("POSDATA")
        self.sock.sendall(np.ascontiguousarray(h.T).tobytes() + np.ascontiguousarray(np.linalg.inv(h).T).tobytes())
        pos = np.asarray(positions_a) / Bohr
        self.sock.sendall(struct.pack("i", natoms if natoms is not None else len(pos)) + pos.tobytes())

    def getforce(self):
        self.header("GETFORCE")
        assert self._recv(12).decode().strip() == "FORCEREADY"
        e = struct.unpack("d", self._recv(8))[0] * Hartree
        n = struct.unpack("i", self._recv(4))[0]
        f = np.frombuffer(self._recv(24 * n), dtype=np.float64).reshape(n, 3) * Hartree / Bohr
        vir = np.frombuffer(self._recv(72), dtype=np.float64).reshape(3, 3).T * Hartree
        m = struct.unpack("i", self._recv(4))[0]
        extra = json.loads(self._recv(m).decode()) if m else {}
        return e, f, vir, extra

    def frame(self, atoms):
        """A full STATUS/POSDATA/GETFORCE exchange; returns (energy eV, forces eV/A, virial eV, extra dict)."""
        if self.status() == "NEEDINIT":
            self.init()
        self.status()
        self.posdata(atoms.cell.array, atoms.positions)
        assert self.status() == "HAVEDATA"
        return self.getforce()

    def exit(self):
        self.header("EXIT")
        self.sock.close()

    def close(self):
        self.sock.close()


def md_like(model, mesh, amplitudes, seed):
    """Frames of one random displacement pattern of ``model.supercell(mesh)`` at the given amplitudes (A): the
    Bayesian error follows the amplitude, so the local maxima a server flags are known."""
    rng = np.random.default_rng(seed)
    base = model.supercell(mesh)
    pattern = rng.normal(size=base.positions.shape)
    frames = []
    for a in amplitudes:
        at = base.copy()
        at.positions = base.positions + a * pattern
        frames.append(at)
    return frames
