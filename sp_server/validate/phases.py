"""Metastable phases (paper's Table 2 and Fig. 3): the local minima of the polar "chain" instability of a cubic
perovskite, each built from its distortion pattern and relaxed (cell + positions) under its own symmetry.

A phase is a sum of soft modes: the lowest harmonic mode at a wave vector q (Gamma, X or M; reduced coordinates)
polarised along a Cartesian direction d (:func:`sp_server.otf.structures.soft_pattern`), frozen into the smallest
supercell that holds all its q (:data:`sp_server.otf.structures.PHASES`); the space groups (checked with spglib by the
tests):

    P4mm    Gamma, d = [001]            Amm2  Gamma, d = [110]             R3m   Gamma, d = [111]
    Pmma    X=(1/2,0,0), d = [001]      Cmcm  X, d = [011]                 P4/nmm  M=(1/2,1/2,0), d = [001]
    Pbcm    X, d = [010]  +  Y=(0,1/2,0), d = [001]

Each calculator relaxes every phase from the same start with ASE's FixSymmetry (so an antipolar saddle of the full
energy surface stays in its symmetry, as the paper's local minima do).  Units: energies meV per 5-atom cell relative
to the same calculator's cubic reference (the model's reference cell), amplitudes A.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from ..model.model import Model
from ..otf.structures import PHASES, _cells, phase_structure, polar_patterns
from .ground_state import cubic_energy, displacements, relax


@dataclass
class Phase:
    """One relaxed phase with one calculator (units in the module docstring)."""

    calculator: str
    phase: str
    supercell: list
    space_group: str        # of the relaxed structure (spglib, symprec 1e-3)
    kept_symmetry: bool     # the relaxed structure still has the phase's space group (not collapsed to cubic)
    energy_mev: float       # per 5-atom cell, relative to the cubic reference
    lengths: list           # a, b, c of the relaxed supercell divided by the supercell multiples, A
    angles: list
    volume: float           # A^3 per 5-atom cell
    amplitudes: dict        # "q=(qx,qy,qz)" -> amplitude of that wave vector's displacements, A (rms per cell x
                            # sqrt(nat): the norm of the 5-atom pattern)
    b_site: float           # largest B-site displacement, A
    steps: int
    converged: bool
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def space_group(atoms, symprec: float = 1e-3) -> str:
    import spglib
    return spglib.get_spacegroup((atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers),
                                 symprec=symprec) or "?"


def amplitudes(model: Model, mesh, u: np.ndarray) -> dict:
    """Norm of each commensurate wave vector's component of u ((ncells, nat, 3), A): ||sum_L w(L) u(L)|| / sum_L
    w(L)^2 with w(L) = cos(2 pi q.L), so that a pure wave p w(L) gives ||p||; components below 1e-4 A left out."""
    cells = _cells(mesh)
    out = {}
    for q in _cells(mesh) / np.asarray(mesh, dtype=float):
        wave = np.cos(2 * np.pi * cells @ q)
        comp = np.einsum("L,Lia->ia", wave, u) / np.sum(wave ** 2)
        amp = float(np.linalg.norm(comp))
        if amp > 1e-4:
            out["q=(" + ",".join(f"{x:g}" for x in q) + ")"] = amp
    return out


def relax_phase(model: Model, calc, calc_name: str, name: str, *, fmax: float = 2e-3, steps: int = 500,
                amplitude: float = 0.1) -> Phase:
    """Build and relax ``name`` (a key of :data:`PHASES`) with ``calc`` under its symmetry."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}: choose among {list(PHASES)}")
    t0 = time.monotonic()
    mesh, _ = PHASES[name]
    ncell = int(np.prod(mesh))
    e_cubic = cubic_energy(model, calc, mesh)
    start = phase_structure(model, name, amplitude)
    target = space_group(start)
    atoms, nsteps, converged = relax(start, calc, fmax=fmax, steps=steps, symmetry=True)
    atoms.set_constraint()
    sg = space_group(atoms)
    u = displacements(model, mesh, atoms)
    par = atoms.cell.cellpar()
    b = int(np.argmax(np.abs(polar_patterns(model)).min(axis=0)))     # the B site: moves most along all axes
    return Phase(calc_name, name, list(mesh), sg, sg == target,
                 float(1000 * (atoms.get_potential_energy() - e_cubic) / ncell),
                 [float(x) / n for x, n in zip(par[:3], mesh)], [float(x) for x in par[3:]],
                 float(atoms.get_volume() / ncell), amplitudes(model, mesh, u),
                 float(np.linalg.norm(u[:, b], axis=1).max()), nsteps, converged, time.monotonic() - t0)


def metastable_phases(model: Model, calcs: dict, names=tuple(PHASES), *, log=print, progress=False, **kw) -> dict:
    """Every phase of ``names`` with every calculator of ``calcs`` (name -> ASE calculator): {phase: {calc:
    Phase, or the error message (str) of a relaxation that failed}}.  A failure (e.g. a model relaxation that leaves
    the model's range: a hole of the model along that phase's path) is logged and the other phases go on."""
    from tqdm.auto import tqdm
    for name in names:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}: choose among {list(PHASES)}")
    out: dict = {}
    jobs = [(n, c) for n in names for c in calcs]
    for name, cname in tqdm(jobs, desc="metastable phases", disable=not progress, leave=False):
        try:
            p = relax_phase(model, calcs[cname], cname, name, **kw)
        except Exception as exc:    # noqa: BLE001 - one phase's failure is a result; the others go on
            out.setdefault(name, {})[cname] = f"{type(exc).__name__}: {exc}"
            log(f"phase {name} with {cname}: FAILED ({type(exc).__name__}: {exc})")
            continue
        out.setdefault(name, {})[cname] = p
        log(f"phase {name} with {cname}: {p.space_group}, E - E_cubic {p.energy_mev:.2f} meV/cell, B-site "
            f"{p.b_site:.3f} A ({p.steps} steps, {p.seconds:.1f} s{'' if p.converged else ', NOT converged'}"
            f"{'' if p.kept_symmetry else ', symmetry CHANGED'})")
    return out
