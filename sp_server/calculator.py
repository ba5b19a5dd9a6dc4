"""ASE calculator over a second-principles model (energy, forces, stress on any n1 x n2 x n3 supercell).

Units are ASE's: eV, eV/A, eV/A^3 (stress = 1/V dE/d eps, Voigt xx yy zz yz xz xy).
"""
from __future__ import annotations

from pathlib import Path

from ase.calculators.calculator import Calculator, all_changes

from .model.model import Model
from .model.native import load_model
from .potential import Evaluator


class SecondPrinciplesCalculator(Calculator):
    """ASE Calculator for an sp_server model.

    >>> calc = SecondPrinciplesCalculator("model.h5")          # or a Model object
    >>> atoms = calc.model.supercell((4, 4, 4)); atoms.calc = calc
    >>> atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()

    ``parts`` restricts the energy to some of sp_server.potential.PARTS (e.g. only the harmonic part).
    With ``errors=True`` and a model that carries a posterior, results hold 'bayesian_error': energy std per
    reference cell (meV), largest force-component std (eV/A), largest stress-component std (GPa) and the largest
    std of one reference cell's energy (meV); with ``errors="local"`` only the first and the last (the cheap ones of
    the energy pass, docs/performance.md).
    results also hold 'energy_parts' (dict, eV) and, with ``design=True``, the design rows
    'phi_energy' (nz), 'phi_forces' (nz, N, 3) and 'phi_stress' (nz, 6) of the anharmonic coefficients.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model, parts=None, design: bool = False, errors=False, max_strain: float = 0.25,
                 **kwargs):
        if errors not in (True, False, "local"):
            raise ValueError(f"errors must be True, False or 'local', got {errors!r}")
        super().__init__(**kwargs)
        self.model = model if isinstance(model, Model) else load_model(Path(model))
        self.evaluator = Evaluator(self.model, parts, max_strain=max_strain)
        self.design = design
        self.errors = errors

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        res = self.evaluator.evaluate(self.atoms.cell.array, self.atoms.positions, self.atoms.numbers,
                                      design=self.design, errors=self.errors is True,
                                      local_errors=self.errors == "local")
        self.results = {
            "energy": res.energy,
            "free_energy": res.energy,
            "forces": res.forces,
            "stress": res.stress,
            "energy_parts": dict(res.parts),
            "max_displacement": res.frame.max_displacement,
        }
        if self.design:
            self.results.update(phi_energy=res.phi_energy, phi_forces=res.phi_forces, phi_stress=res.phi_stress)
        if res.errors is not None:
            self.results["bayesian_error"] = res.errors
