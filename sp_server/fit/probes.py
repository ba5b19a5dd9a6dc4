"""Probe rays: where a lattice model must rise, whatever its training data say.

A Taylor polynomial fitted to small distortions can fall anywhere the data never went.  Three kinds of rays from
the reference, each with the energies it must have, are what the boundedness check (:mod:`sp_server.fit.bound`)
looks at and what the constrained fit (:mod:`sp_server.fit.constrained`) enforces:

* ``random``: random displacements of every atom (RMS 1 A at amplitude 1) with, on half of them, a random strain
  (largest component ``max_strain`` at amplitude 1).  The energy stays above a floor (eV per reference cell below
  the reference: far below any real well) at every amplitude and rises at the large ones.
* ``atom``: one atom of the supercell moved alone away from its site, the others held at theirs, along a direction.
  Its energy rises from ``atom_rise_from`` (A) on and is above the reference's from ``atom_floor_from`` on: a lone
  atom pushed into its neighbours always climbs (the polar instabilities of perovskites are collective; one atom
  alone in a fixed lattice is stable).  This is where fitted models break first: in the first BaTiO3 fits one
  oxygen moved 0.3 A across its Ti-O bond fell by 3 eV.
* ``strain``: homogeneous strain alone; the energy rises from 4% on and stays above the floor.
* ``background strain`` / ``background random``: the same from the structures the MDs start from (the polar
  wells): strain rises from 6% on and random distortions stay above the floor.  An NPT MD at 15 K from the R well
  of an early BaTiO3 fit sheared its cell by 2% in 40 fs and fell by 1.7 eV per cell: a polar-strain coupling
  that no ray from the cubic reference sees.

Every ray is a list of configurations (mesh, u, eta) at increasing amplitude, and a list of linear conditions on
the energies there: E_k - E_{k-1} >= margin (growth) or E_k >= floor (floor).  Units: A, eV (totals of the
supercell); floors are given per reference cell and multiplied by the number of cells.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ProbeSettings:
    n_directions: int = 200          # random rays
    amplitudes: tuple = (0.25, 0.5, 0.75, 1.0, 1.25)   # x (RMS 1 A displacement, max_strain)
    growth_from: float = 0.75        # random rays rise from this amplitude on
    max_displacement: float = 1.0    # A, RMS displacement per atom at amplitude 1
    max_strain: float = 0.08         # largest strain component at amplitude 1
    floor: float = -0.25             # eV per reference cell relative to the reference energy
    atom_directions: int = 13        # per site: the 3 axes, 6 face and 4 body diagonals, both ways (26 rays);
                                     # another number: that many random directions, both ways
    atom_amplitudes: tuple = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)   # A
    atom_rise_from: float = 0.2      # A
    atom_floor_from: float = 0.4     # A
    atom_margin: float = 1e-3        # eV: least rise per amplitude step of a lone atom
    strain_directions: int = 12
    strain_amplitudes: tuple = (0.02, 0.04, 0.06, 0.08, 0.1)
    growth_margin: float = 0.01      # eV per reference cell: least rise per step of the random and strain rays
    mesh: tuple = (2, 2, 2)
    seed: int = 1000
    backgrounds: tuple = ()          # (name, u0 (mesh + (nat, 3)) A): structures the MDs start from or pass
                                     # through (the polar R, O, T wells); strain rays and random rays start there
    background_strain_directions: int = 8
    background_strain_amplitudes: tuple = (0.02, 0.04, 0.06, 0.08, 0.1)
    background_directions: int = 12  # random displacement rays per background (amplitudes x 0.5)


@dataclass
class Ray:
    """Configurations (mesh, u0 + a_k u (n1, n2, n3, nat, 3) A, eta0 + a_k eta Voigt) and the conditions on their
    energies:
    growth (k, margin eV): E_k - E_{k-1} >= margin;  floor (k, value eV): E_k - E_reference_total >= value."""

    kind: str
    mesh: tuple
    u: np.ndarray
    eta: np.ndarray
    amplitudes: np.ndarray
    growth: list = field(default_factory=list)
    floor: list = field(default_factory=list)
    info: str = ""
    u0: np.ndarray = None      # configurations u0 + a u, eta0 + a eta (default: from the reference)
    eta0: np.ndarray = None

    def configurations(self):
        u0 = 0.0 if self.u0 is None else self.u0
        eta0 = 0.0 if self.eta0 is None else self.eta0
        for a in self.amplitudes:
            yield self.mesh, u0 + a * self.u, eta0 + a * self.eta

    def failures(self, energies: np.ndarray, e_ref_total: float, tol: float = 1e-9) -> list:
        """The conditions the energies (eV, totals, one per amplitude) break, as readable strings."""
        e = np.asarray(energies, dtype=float)
        out = []
        if not np.all(np.isfinite(e)):
            return [f"non-finite energy at amplitude {self.amplitudes[int(np.argmin(np.isfinite(e)))]:g}"]
        for k, margin in self.growth:
            if e[k] - e[k - 1] < margin - tol * max(1.0, abs(margin)):
                out.append(f"falls by {e[k - 1] - e[k]:.3g} eV from amplitude {self.amplitudes[k - 1]:g} to "
                           f"{self.amplitudes[k]:g}")
        for k, value in self.floor:
            if e[k] - e_ref_total < value - tol * max(1.0, abs(value)):
                out.append(f"{e[k] - e_ref_total:.3g} eV at amplitude {self.amplitudes[k]:g}, below {value:.3g}")
        return out


def _lattice_directions() -> np.ndarray:
    d = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, -1, 0], [1, 0, 1], [1, 0, -1], [0, 1, 1], [0, 1, -1],
         [1, 1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]]
    d = np.array(d, dtype=float)
    return d / np.linalg.norm(d, axis=1)[:, None]


def random_rays(natoms: int, settings: ProbeSettings, rng) -> list:
    mesh = tuple(settings.mesh)
    ncell = int(np.prod(mesh))
    amps = np.asarray(settings.amplitudes, dtype=float)
    out = []
    for _ in range(settings.n_directions):
        u = rng.normal(size=mesh + (natoms, 3))
        u -= u.reshape(-1, 3).mean(axis=0)
        u *= settings.max_displacement / np.sqrt((u ** 2).sum(axis=-1).mean())
        eta = rng.normal(size=6) * (rng.random() < 0.5)
        if np.abs(eta).max() > 0:
            eta *= settings.max_strain / np.abs(eta).max()
        growth = [(k, ncell * settings.growth_margin) for k in range(1, len(amps))
                  if amps[k - 1] >= settings.growth_from - 1e-12]
        floor = [(k, ncell * settings.floor) for k in range(len(amps))]
        out.append(Ray("random", mesh, u, eta, amps, growth, floor))
    return out


def atom_rays(labels, settings: ProbeSettings, rng) -> list:
    """One ray per site of the reference and direction (both ways), the atom in cell (0, 0, 0) of the mesh."""
    mesh = tuple(settings.mesh)
    nat = len(labels)
    amps = np.asarray(settings.atom_amplitudes, dtype=float)
    if settings.atom_directions == 13:
        dirs = _lattice_directions()
    else:
        dirs = rng.normal(size=(settings.atom_directions, 3))
        dirs /= np.linalg.norm(dirs, axis=1)[:, None]
    growth = [(k, settings.atom_margin) for k in range(1, len(amps)) if amps[k - 1] >= settings.atom_rise_from - 1e-12]
    floor = [(k, 0.0) for k in range(len(amps)) if amps[k] >= settings.atom_floor_from - 1e-12]
    out = []
    for site in range(nat):
        for d in dirs:
            for sign in (1.0, -1.0):
                u = np.zeros(mesh + (nat, 3))
                u[0, 0, 0, site] = sign * d
                out.append(Ray("atom", mesh, u, np.zeros(6), amps, growth, floor,
                               info=f"{labels[site]} along {np.round(sign * d, 3).tolist()}"))
    return out


def strain_rays(natoms: int, settings: ProbeSettings, rng) -> list:
    mesh = (1, 1, 1)
    amps = np.asarray(settings.strain_amplitudes, dtype=float)
    out = []
    for _ in range(settings.strain_directions):
        eta = rng.normal(size=6)
        eta /= np.abs(eta).max()
        growth = [(k, settings.growth_margin) for k in range(1, len(amps)) if amps[k - 1] >= 0.04 - 1e-12]
        floor = [(k, settings.floor) for k in range(len(amps))]
        out.append(Ray("strain", mesh, np.zeros(mesh + (natoms, 3)), eta, amps, growth, floor))
    return out


def background_rays(settings: ProbeSettings, rng) -> list:
    mesh = tuple(settings.mesh)
    ncell = int(np.prod(mesh))
    out = []
    for name, u0 in settings.backgrounds:
        u0 = np.asarray(u0, dtype=float).reshape(mesh + (-1, 3))
        amps = np.asarray(settings.background_strain_amplitudes, dtype=float)
        for _ in range(settings.background_strain_directions):
            eta = rng.normal(size=6)
            eta /= np.abs(eta).max()
            growth = [(k, ncell * settings.growth_margin) for k in range(1, len(amps)) if amps[k - 1] >= 0.06 - 1e-12]
            floor = [(k, ncell * settings.floor) for k in range(len(amps))]
            out.append(Ray("background strain", mesh, np.zeros_like(u0), eta, amps, growth, floor, info=name,
                           u0=u0, eta0=np.zeros(6)))
        ramps = 0.5 * np.asarray(settings.amplitudes, dtype=float)
        for _ in range(settings.background_directions):
            u = rng.normal(size=u0.shape)
            u -= u.reshape(-1, 3).mean(axis=0)
            u *= settings.max_displacement / np.sqrt((u ** 2).sum(axis=-1).mean())
            out.append(Ray("background random", mesh, u, np.zeros(6), ramps, [],
                           [(k, ncell * settings.floor) for k in range(len(ramps))], info=name, u0=u0,
                           eta0=np.zeros(6)))
    return out


def probe_rays(reference, settings: ProbeSettings) -> list:
    """All rays of the settings for ``reference`` (deterministic for a given seed)."""
    rng = np.random.default_rng(settings.seed)
    rays = random_rays(reference.natoms, settings, rng)
    rays += atom_rays(list(reference.labels), settings, rng)
    rays += strain_rays(reference.natoms, settings, rng)
    rays += background_rays(settings, rng)
    return [r for r in rays if r.growth or r.floor]


def atom_ray_in(mesh, u_background, eta, atom: int, direction, amplitudes=(0.3, 0.45, 0.6, 0.8, 1.0, 1.2),
                margin: float = 1e-3, info: str = "") -> Ray:
    """A lone-atom ray in a displaced background: atom ``atom`` (flat index over the supercell) moved from its
    site along ``direction`` while every other atom keeps its displacement in ``u_background`` and the strain stays
    ``eta`` (the frame where a hot MD saw that atom escape).  The energy must rise along it."""
    mesh = tuple(int(n) for n in mesh)
    bg = np.asarray(u_background, dtype=float).reshape(-1, 3).copy()
    bg[atom] = 0.0
    u = np.zeros_like(bg)
    d = np.asarray(direction, dtype=float)
    u[atom] = d / np.linalg.norm(d)
    amps = np.asarray(amplitudes, dtype=float)
    shape = mesh + (-1, 3)
    return Ray("atom in frame", mesh, u.reshape(shape), np.zeros(6), amps, [(k, margin) for k in range(1, len(amps))],
               [], info=info, u0=bg.reshape(shape), eta0=np.asarray(eta, dtype=float))


def save_rays(path, rays: list):
    """Write rays to an .npz file (atomically: a full disk leaves the previous file).  Units: A, strain (Voigt),
    eV for the conditions' margins and floors.  Read back with :func:`load_rays`."""
    from ..io.jsonfile import atomic_path
    data = {"n": np.array(len(rays))}
    for i, r in enumerate(rays):
        p = f"{i}."
        data[p + "kind"] = np.array(r.kind)
        data[p + "info"] = np.array(r.info)
        data[p + "mesh"] = np.asarray(r.mesh, dtype=int)
        data[p + "u"] = np.asarray(r.u, dtype=float)
        data[p + "eta"] = np.asarray(r.eta, dtype=float)
        data[p + "amplitudes"] = np.asarray(r.amplitudes, dtype=float)
        data[p + "growth"] = np.asarray(r.growth, dtype=float).reshape(-1, 2)
        data[p + "floor"] = np.asarray(r.floor, dtype=float).reshape(-1, 2)
        if r.u0 is not None:
            data[p + "u0"] = np.asarray(r.u0, dtype=float)
        if r.eta0 is not None:
            data[p + "eta0"] = np.asarray(r.eta0, dtype=float)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **data)


def load_rays(path) -> list:
    """Rays written by :func:`save_rays`; ValueError naming the file when it cannot be read."""
    try:
        with np.load(path) as data:
            out = []
            for i in range(int(data["n"])):
                p = f"{i}."
                get = (lambda k: data[p + k] if p + k in data.files else None)
                out.append(Ray(str(data[p + "kind"]), tuple(int(n) for n in data[p + "mesh"]), data[p + "u"],
                               data[p + "eta"], data[p + "amplitudes"],
                               [(int(k), float(v)) for k, v in data[p + "growth"]],
                               [(int(k), float(v)) for k, v in data[p + "floor"]], info=str(data[p + "info"]),
                               u0=get("u0"), eta0=get("eta0")))
            return out
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a file of probe rays ({exc})") from None
