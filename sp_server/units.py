"""Physical constants and unit conversions: the one place where numbers like Hartree or Bohr come from.

Internal units of sp_server are eV, Angstrom, amu and fs (ASE's); i-PI and MULTIBINIT speak Hartree and bohr.
Convert only at the edges, always with the names below (all taken from ase.units).
"""
from ase import units as _u

#: 1 Hartree in eV
HARTREE_EV = _u.Hartree
#: 1 bohr in Angstrom
BOHR_A = _u.Bohr
#: Coulomb prefactor e^2 / (4 pi eps0) in eV * Angstrom (= Hartree * bohr)
COULOMB_EV_A = _u.Hartree * _u.Bohr
#: 1 GPa in eV / Angstrom^3
GPA_EV_A3 = _u.GPa
#: Boltzmann constant in eV / K
KB_EV = _u.kB
