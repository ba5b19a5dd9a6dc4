"""sp_server: second-principles lattice models, a fast Numba evaluator, an ASE calculator and (soon) an i-PI server.

Internal units: eV, Angstrom, amu (ASE's); conversions to Hartree/bohr happen only at the file and socket edges.
"""
from .calculator import SecondPrinciplesCalculator
from .model import Model, load_model, save_model
from .potential import Evaluator, SupercellPotential

__version__ = "0.1.0"

__all__ = ["Evaluator", "Model", "SecondPrinciplesCalculator", "SupercellPotential", "load_model", "save_model"]
