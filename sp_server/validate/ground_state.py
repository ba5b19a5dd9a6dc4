"""Validation items on the unit cell, model and oracle side by side: the ground state (paper's Table 1) and the
double well from the cubic reference to it (Fig. 7).

Both calculators are plain ASE calculators (eV, A); every structure is built from the model's reference so that
model and oracle see exactly the same atoms.  Polarization P = e/V sum_i Z_i u_i (C/m^2) with the model's Born
charges when it has them, else with nominal ionic charges (declared in the result: ``born_charges`` field).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS

from ..calculator import SecondPrinciplesCalculator
from ..model.model import Model
from ..otf.structures import polar_structure
from ..units import GPA_EV_A3

E_PER_A2_IN_C_PER_M2 = 16.02176634  # 1 e/A^2 in C/m^2
NOMINAL_CHARGES = {"Ba": 2.0, "Sr": 2.0, "Ca": 2.0, "Pb": 2.0, "Ti": 4.0, "Zr": 4.0, "Hf": 4.0, "O": -2.0}


@dataclass
class GroundState:
    """A relaxed phase: lengths A, angles degrees, volume A^3 per cell, energies meV per cell relative to the cubic
    reference of the same calculator, displacements (nat, 3) A relative to the A site, polarization C/m^2."""

    calculator: str
    phase: str
    lengths: list        # a, b, c of the relaxed cell, A
    angles: list         # alpha, beta, gamma, degrees
    a: float             # mean length (the pseudo-cubic lattice constant)
    alpha: float         # mean angle (the rhombohedral angle for R)
    volume: float
    energy_mev: float
    displacements: list
    polarization: list
    polarization_norm: float
    born_charges: str
    steps: int
    converged: bool
    max_force: float
    max_stress_gpa: float
    structure: Any = field(default=None, repr=False, compare=False)   # the relaxed Atoms (not in as_dict)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "structure"}


@dataclass
class DoubleWell:
    """Energies (meV per cell, relative to cubic) along u(lambda) = lambda x the model's ground-state pattern."""

    amplitudes: list
    energies: dict = field(default_factory=dict)   # calculator name -> list

    def as_dict(self) -> dict:
        return asdict(self)


def relax(atoms, calc, *, fmax: float = 1e-3, steps: int = 1000, symmetry: bool = False):
    """Relax cell and positions (BFGS on a FrechetCellFilter; ``symmetry``: keep the starting space group, ASE's
    FixSymmetry at symprec 1e-3); returns (atoms, steps, converged)."""
    atoms = atoms.copy()
    atoms.calc = calc
    if symmetry:
        from ase.constraints import FixSymmetry
        atoms.set_constraint(FixSymmetry(atoms, symprec=1e-3))
    opt = BFGS(FrechetCellFilter(atoms), logfile=None)
    with warnings.catch_warnings():   # scipy's logm inside the cell filter warns about 1e-13 round-off
        warnings.filterwarnings("ignore", message="logm result may be inaccurate")
        converged = bool(opt.run(fmax=fmax, steps=steps))
    return atoms, int(opt.nsteps), converged


def displacements(model: Model, mesh, atoms, *, frame_cell: bool = False) -> np.ndarray:
    """(ncells, nat, 3) displacements (A) of ``atoms`` (in the order of ``model.supercell(mesh)``) from the reference
    sites, the mass-weighted mean (a uniform translation) removed: fractional differences times the reference cell
    (the reference axes), or times the frame's own cell when ``frame_cell`` (the sites scaled with the cell, as an
    MD frame's polarization wants)."""
    ref = model.supercell(mesh)
    frac = atoms.get_scaled_positions(wrap=False) - ref.get_scaled_positions(wrap=False)
    frac -= np.round(frac)
    u = frac @ (atoms.cell.array if frame_cell else ref.cell.array)
    m = ref.get_masses()
    u -= (m[:, None] * u).sum(axis=0) / m.sum()
    return u.reshape(-1, model.natoms, 3)


def cubic_energy(model: Model, calc, mesh=(1, 1, 1)) -> float:
    """``calc``'s energy (eV) of the model's cubic reference repeated ``mesh``: the zero of every E - E_cubic."""
    cubic = model.supercell(tuple(mesh))
    cubic.calc = calc
    return float(cubic.get_potential_energy())


def _charges(model: Model):
    if model.harmonic.born_charges is not None:
        return np.asarray(model.harmonic.born_charges), "model Born charges"
    symbols = [s.rstrip("0123456789") for s in model.reference.labels]
    missing = sorted({s for s in symbols if s not in NOMINAL_CHARGES})
    if missing:
        return None, f"none (no Born charges, no nominal charge for {missing})"
    z = np.array([NOMINAL_CHARGES[s] * np.eye(3) for s in symbols])
    return z, "nominal ionic charges (the model has no Born charges): an approximation"


def ground_state(model: Model, calc, name: str, phase: str = "R", *, fmax: float = 1e-3,
                 start_amplitude: float = 0.1) -> GroundState:
    """Relax the ``phase`` (R, O, T) unit cell, started from the model's soft mode along its polar axis, with
    ``calc``; energies relative to the same calculator's energy of the cubic reference."""
    e_cubic = cubic_energy(model, calc)
    atoms, steps, converged = relax(polar_structure(model, (1, 1, 1), phase, start_amplitude), calc, fmax=fmax)
    par = atoms.cell.cellpar()
    # displacements relative to the A site, in the relaxed cell's own frame mapped back to the cubic axes
    u = displacements(model, (1, 1, 1), atoms)[0]
    u -= u[0]
    charges, label = _charges(model)
    pol = (np.einsum("iab,ib->a", charges, u) / atoms.get_volume() * E_PER_A2_IN_C_PER_M2
           if charges is not None else np.full(3, np.nan))
    forces = atoms.get_forces()
    return GroundState(name, phase, [float(x) for x in par[:3]], [float(x) for x in par[3:]],
                       float(np.mean(par[:3])), float(np.mean(par[3:])), float(atoms.get_volume()),
                       float(1000 * (atoms.get_potential_energy() - e_cubic)), u.tolist(), pol.tolist(),
                       float(np.linalg.norm(pol)), label, steps, converged, float(np.abs(forces).max()),
                       float(np.abs(atoms.get_stress()).max() / GPA_EV_A3), structure=atoms)


def double_well(model: Model, calcs: dict, pattern, amplitudes=np.linspace(-1.4, 1.4, 29)) -> DoubleWell:
    """Energy of the cubic reference cell displaced by lambda x ``pattern`` ((nat, 3), A) for every calculator in
    ``calcs`` (name -> ASE calculator), meV per cell relative to each calculator's cubic energy."""
    pattern = np.asarray(pattern, dtype=float)
    out = DoubleWell([float(a) for a in amplitudes])
    for name, calc in calcs.items():
        atoms = model.supercell((1, 1, 1))
        atoms.calc = calc
        base = atoms.positions.copy()
        e0 = atoms.get_potential_energy()
        energies = []
        for lam in amplitudes:
            atoms.positions = base + lam * pattern
            energies.append(float(1000 * (atoms.get_potential_energy() - e0)))   # float32 from some oracles
        out.energies[name] = energies
    return out


def model_calculator(model: Model):
    return SecondPrinciplesCalculator(model)
