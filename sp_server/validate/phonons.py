"""Phonon dispersions (paper's Fig. 4) with phonopy, model and oracle side by side on the same path.

Each calculator's own relaxed phase (cell + positions, :func:`sp_server.validate.ground_state.relax`) gets finite
displacements on a supercell (phonopy, 0.01 A, +- displacements), its force constants, and the band structure
along one path in the reduced coordinates of the pseudo-cubic 5-atom cell (Gamma-X-M-Gamma-R-X|M-R), so that the
curves of two calculators are compared point by point.  Frequencies in THz (imaginary modes negative).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from ase import Atoms

from ..fit.harmonic import ase_atoms, phonopy_atoms

PATH = [[[0, 0, 0], [0.5, 0, 0], [0.5, 0.5, 0], [0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0]],
        [[0.5, 0.5, 0], [0.5, 0.5, 0.5]]]
LABELS = ["$\\Gamma$", "X", "M", "$\\Gamma$", "R", "X|M", "R"]


@dataclass
class Dispersion:
    """Band structure of one calculator: distances along the path (1/A), frequencies (npoints, nbands) THz."""

    calculator: str
    phase: str
    distances: list
    frequencies: list
    ticks: list
    labels: list
    supercell: list
    segments: list       # number of q-points of each path segment (segments are plotted separately)

    def as_dict(self) -> dict:
        return asdict(self)


def dispersion(atoms: Atoms, calc, name: str, phase: str, *, supercell=(2, 2, 2), npoints: int = 31,
               distance: float = 0.01) -> Dispersion:
    """Finite-displacement phonons of the relaxed ``atoms`` with ``calc``; band structure along :data:`PATH`."""
    from phonopy import Phonopy
    from phonopy.phonon.band_structure import get_band_qpoints
    ph = Phonopy(phonopy_atoms(atoms), supercell_matrix=np.diag(supercell), primitive_matrix=np.eye(3), log_level=0)
    ph.generate_displacements(distance=distance, is_plusminus=True)
    forces = []
    for sc in ph.supercells_with_displacements:
        a = ase_atoms(sc)
        a.calc = calc
        forces.append(np.asarray(a.get_forces(), dtype=float))
    ph.forces = np.array(forces)
    ph.produce_force_constants()
    ph.symmetrize_force_constants(show_drift=False)
    qpoints = get_band_qpoints([np.array(seg, dtype=float) for seg in PATH], npoints=npoints)
    ph.run_band_structure(qpoints, path_connections=[True] * (len(PATH[0]) - 2) + [False, True], labels=LABELS)
    bands = ph.band_structure
    dist = np.concatenate(bands.distances)
    freq = np.concatenate(bands.frequencies)
    ticks = [float(d[0]) for d in bands.distances] + [float(bands.distances[-1][-1])]
    return Dispersion(name, phase, dist.tolist(), freq.tolist(), ticks, LABELS, list(supercell),
                      [len(d) for d in bands.distances])


def compare(a: Dispersion, b: Dispersion) -> dict:
    """RMS and largest difference of the frequencies (THz, band by band, sorted at each q) of two dispersions."""
    fa, fb = np.sort(np.asarray(a.frequencies), axis=1), np.sort(np.asarray(b.frequencies), axis=1)
    diff = fa - fb
    return {"rms_thz": float(np.sqrt(np.mean(diff ** 2))), "max_thz": float(np.abs(diff).max()),
            "lowest_model_thz": float(fa.min()), "lowest_other_thz": float(fb.min())}
