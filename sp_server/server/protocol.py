"""The i-PI socket protocol, driver side: message framing, units and the virial convention.

Engines (i-PI, ASE's SocketIOCalculator, LAMMPS as an engine through our bridge) listen; drivers connect and
answer STATUS / INIT / POSDATA / GETFORCE / EXIT.  Numbers are native-endian float64/int32, headers 12 ASCII
bytes padded with spaces.  POSDATA carries the cell h (lattice vectors as columns) and its inverse as 9 doubles
each (row-major h^T, i.e. ASE's row cell), then natoms and positions, all in bohr; FORCEREADY answers energy (Ha),
natoms, forces (Ha/bohr), the virial -V sigma (Ha, 3x3) and an extra string (here JSON).
"""
from __future__ import annotations

import socket
import struct

import numpy as np

from ..units import BOHR_A, HARTREE_EV

HEADER = 12
MAX_ATOMS = 10_000_000


class ProtocolError(RuntimeError):
    """The peer sent something that is not the i-PI protocol (malformed header, truncated message, bad size)."""


class EngineClosed(ConnectionError):
    """The engine closed the socket between two messages (how ASE and LAMMPS end a run without EXIT)."""


def unix_socket_path(address: str) -> str:
    """i-PI's convention: --unix ADDRESS means the socket file /tmp/ipi_ADDRESS."""
    path = f"/tmp/ipi_{address}"
    if len(path.encode()) > 107:
        raise ValueError(f"UNIX socket path {path!r} is longer than the 107 bytes the OS allows (AF_UNIX path too "
                         "long): use a shorter --address")
    return path


class Connection:
    """One driver connection; every read is exact-length with a timeout, so a dead engine never hangs us."""

    def __init__(self, sock: socket.socket, timeout: float | None = None):
        self.sock = sock
        self.sock.settimeout(timeout)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def shutdown(self):
        """Unblock a thread waiting in recv (used on SIGTERM)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ProtocolError(f"connection closed by the engine after {len(buf)} of {n} bytes")
            buf.extend(chunk)
        return bytes(buf)

    def recv_header(self) -> str:
        first = self.sock.recv(HEADER)
        if not first:
            raise EngineClosed("the engine closed the connection")
        raw = first + self._recv_exact(HEADER - len(first)) if len(first) < HEADER else first
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(f"malformed header {raw!r} (not ASCII)") from None
        return text.strip()

    def send_header(self, msg: str):
        self.sock.sendall(msg.ljust(HEADER).encode("ascii"))

    def recv_int(self) -> int:
        return struct.unpack("i", self._recv_exact(4))[0]

    def recv_doubles(self, n: int) -> np.ndarray:
        return np.frombuffer(self._recv_exact(8 * n), dtype=np.float64).copy()

    def recv_init(self) -> tuple[int, str]:
        bead = self.recv_int()
        n = self.recv_int()
        if not 0 <= n <= 1 << 20:
            raise ProtocolError(f"INIT string length {n} is not plausible")
        return bead, self._recv_exact(n).decode("utf-8", errors="replace")

    def recv_posdata(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns (cell rows in Angstrom, positions in Angstrom)."""
        cell = self.recv_doubles(9).reshape(3, 3).T * BOHR_A  # wire: h row-major; ASE rows = h^T
        self.recv_doubles(9)  # inverse cell: not needed
        natoms = self.recv_int()
        if not 0 < natoms <= MAX_ATOMS:
            raise ProtocolError(f"POSDATA atom count {natoms} is not plausible")
        pos = self.recv_doubles(3 * natoms).reshape(natoms, 3) * BOHR_A
        return cell, pos

    def send_force(self, energy_ev: float, forces_ev_a: np.ndarray, stress_ev_a3: np.ndarray, volume_a3: float,
                   extra: str = ""):
        """Energy eV, forces eV/A, stress (3x3, ASE sign) eV/A^3 -> i-PI units; virial = -V sigma."""
        virial = -volume_a3 * np.asarray(stress_ev_a3).reshape(3, 3) / HARTREE_EV
        forces = np.ascontiguousarray(forces_ev_a, dtype=np.float64) * (BOHR_A / HARTREE_EV)
        payload = extra.encode("utf-8")
        self.send_header("FORCEREADY")
        self.sock.sendall(struct.pack("d", energy_ev / HARTREE_EV) + struct.pack("i", len(forces))
                          + forces.tobytes() + np.ascontiguousarray(virial.T).tobytes()
                          + struct.pack("i", len(payload)) + payload)


def connect(address: str, port: int | None, unix: bool, timeout: float = 600.0):
    """Open a client socket to an engine (TCP_NODELAY on INET, as small systems suffer from Nagle otherwise)."""
    if unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(unix_socket_path(address))
    else:
        sock = socket.create_connection((address, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Connection(sock, timeout)
