"""Numba kernels (the only package that imports numba): harmonic FFT operator, Ewald dipole-dipole, anharmonic terms."""
