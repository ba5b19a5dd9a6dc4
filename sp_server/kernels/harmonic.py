"""Harmonic lattice operator on a periodic supercell by FFT: energy and gradient in O(N log N).

C(k) = sum_R Phi(R) exp(+2 pi i k.R / n) on the n1 x n2 x n3 grid in numpy's rfftn layout; the gradient of
E = 1/2 sum u.Phi.u is irfftn(C(k) rfftn(u)).  Real-space force constants of any range are folded onto the grid,
which is exact for the periodic supercell.  Units follow the caller (eV, Angstrom).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange


def fold_ifc_kgrid(ifc_cells, ifc, mesh) -> np.ndarray:
    """Fold real-space force constants onto an n1 x n2 x n3 supercell and return C(k), (n1, n2, n3//2+1, nat,3,nat,3)."""
    n1, n2, n3 = (int(n) for n in mesh)
    nat = ifc.shape[1]
    folded = np.zeros((n1, n2, n3, nat, 3, nat, 3))
    idx = np.mod(np.asarray(ifc_cells), [n1, n2, n3])
    np.add.at(folded, (idx[:, 0], idx[:, 1], idx[:, 2]), ifc)
    # sum_m Phi(m) exp(+i theta) = conj(sum_m Phi(m) exp(-i theta)) for real Phi
    return np.conj(np.fft.rfftn(folded, axes=(0, 1, 2)))


@njit(cache=True)
def _matvec_range(cmat, vec, out, k0, k1):
    m = vec.shape[1]
    for k in range(k0, k1):
        for i in range(m):
            acc = 0.0 + 0.0j
            for j in range(m):
                acc += cmat[k, i, j] * vec[k, j]
            out[k, i] = acc


@njit(parallel=True, cache=True)
def _matvec_parallel(cmat, vec, out, nchunk):
    nk = vec.shape[0]
    for ch in prange(nchunk):
        _matvec_range(cmat, vec, out, ch * nk // nchunk, (ch + 1) * nk // nchunk)


class HarmonicOperator:
    """The quadratic form of a periodic supercell, stored as C(k) (Hermitian 3nat x 3nat blocks)."""

    def __init__(self, ckgrid: np.ndarray, mesh, parallel: bool = False):
        self.parallel = parallel
        self.mesh = tuple(int(n) for n in mesh)
        n1, n2, n3 = self.mesh
        nk = ckgrid.shape[0] * ckgrid.shape[1] * ckgrid.shape[2]
        if ckgrid.shape[:3] != (n1, n2, n3 // 2 + 1):
            raise ValueError(f"C(k) grid shape {ckgrid.shape[:3]} does not match mesh {self.mesh}")
        self.nat = ckgrid.shape[3]
        m = 3 * self.nat
        self._c = np.ascontiguousarray(ckgrid.reshape(nk, m, m))
        self._kshape = ckgrid.shape[:3]

    def energy_grad(self, u: np.ndarray):
        """u: (n1, n2, n3, nat, 3).  Returns (energy, gradient dE/du of the same shape)."""
        m = 3 * self.nat
        uk = np.ascontiguousarray(np.fft.rfftn(u.reshape(self.mesh + (m,)), axes=(0, 1, 2)))
        gk = np.empty_like(uk)
        nk = gk.shape[0] * gk.shape[1] * gk.shape[2]
        if self.parallel:
            _matvec_parallel(self._c, uk.reshape(-1, m), gk.reshape(-1, m), min(nk, 4 * numba.get_num_threads()))
        else:
            _matvec_range(self._c, uk.reshape(-1, m), gk.reshape(-1, m), 0, nk)
        grad = np.fft.irfftn(gk, s=self.mesh, axes=(0, 1, 2)).reshape(u.shape)
        return 0.5 * float(np.vdot(u, grad)), grad
