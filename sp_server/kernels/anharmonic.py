"""Numba kernels for the anharmonic polynomial: energy, gradients and design rows (one tau_z per coefficient).

Terms are compiled once per model into flat integer arrays (``CompiledTerms``); the unique displacement
differences ("bonds") are evaluated once per cell and shared by every term that uses them.
Units follow the caller (eV, Angstrom); nothing here knows about engines or files.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange


@dataclass
class CompiledTerms:
    """Flat arrays describing every term of every coefficient (supercell independent).

    bonds (nb, 9): atom_a, cell_a(3), atom_b, cell_b(3), direction.
    offsets (no, 3): every cell offset used by a bond, and its opposite; bond_idx (nb, 5): atom_a, offset index
    of cell_a, atom_b, offset index of cell_b, direction.  A supercell turns offsets into a neighbour table.
    Terms t are sorted by coefficient: coefficient z owns terms z_tptr[z]:z_tptr[z+1].
    Factors of term t: tf_bond[tf_ptr[t]:tf_ptr[t+1]] (global bond index), tf_lbond (index into the bonds of its
    coefficient, z_bonds[z_bptr[z]:z_bptr[z+1]]), tf_power.  Strain factors: ts_voigt (0-based), ts_power.
    Gather lists: basis atom i appears in bonds ga_bond[ga_ptr[i]:ga_ptr[i+1]] with sign ga_sign (+1 side a, -1 b)
    and ga_negoff, the offset index of minus that side's cell.
    """

    ncoef: int
    nat: int
    bonds: np.ndarray
    offsets: np.ndarray
    bond_idx: np.ndarray
    t_coef: np.ndarray
    t_weight: np.ndarray
    tf_ptr: np.ndarray
    tf_bond: np.ndarray
    tf_lbond: np.ndarray
    tf_power: np.ndarray
    ts_ptr: np.ndarray
    ts_voigt: np.ndarray
    ts_power: np.ndarray
    z_tptr: np.ndarray
    z_bptr: np.ndarray
    z_bonds: np.ndarray
    ga_ptr: np.ndarray
    ga_bond: np.ndarray
    ga_sign: np.ndarray
    ga_negoff: np.ndarray
    maxf: int
    maxp: int
    bond_origin: tuple = ()  # (coefficient index, coefficient name) of the first term using each bond

    @classmethod
    def from_coefficients(cls, coefficients, nat: int) -> "CompiledTerms":
        bond_index: dict = {}
        bonds = []
        t_coef, t_weight, tf_ptr, tf_bond, tf_lbond, tf_power = [], [], [0], [], [], []
        ts_ptr, ts_voigt, ts_power = [0], [], []
        z_tptr, z_bptr, z_bonds = [0], [0], []
        origin = []
        for z, coef in enumerate(coefficients):
            local: dict = {}
            for term in coef.terms:
                t_coef.append(z)
                t_weight.append(term.weight)
                for d in term.displacements:
                    key = d.key()
                    if key not in bond_index:
                        bond_index[key] = len(bonds)
                        bonds.append([d.atom_a, *d.cell_a, d.atom_b, *d.cell_b, d.direction])
                        origin.append((z, coef.name))
                    gb = bond_index[key]
                    if gb not in local:
                        local[gb] = len(local)
                        z_bonds.append(gb)
                    tf_bond.append(gb)
                    tf_lbond.append(local[gb])
                    tf_power.append(d.power)
                tf_ptr.append(len(tf_bond))
                for s in term.strains:
                    ts_voigt.append(s.voigt - 1)
                    ts_power.append(s.power)
                ts_ptr.append(len(ts_voigt))
            z_tptr.append(len(t_coef))
            z_bptr.append(len(z_bonds))
        bonds = np.array(bonds, dtype=np.int64).reshape(-1, 9)
        offs = sorted({tuple(int(x) for x in r[k:k + 3]) * 1 for r in bonds for k in (1, 5)}
                      | {tuple(-int(x) for x in r[k:k + 3]) for r in bonds for k in (1, 5)} | {(0, 0, 0)})
        oidx = {o: k for k, o in enumerate(offs)}
        bond_idx = np.array([[r[0], oidx[tuple(r[1:4])], r[4], oidx[tuple(r[5:8])], r[8]] for r in bonds],
                            dtype=np.int64).reshape(-1, 5)
        ga = [[] for _ in range(nat)]
        for b, row in enumerate(bonds):
            ga[row[0]].append((b, 1, oidx[tuple(-row[1:4])]))
            ga[row[4]].append((b, -1, oidx[tuple(-row[5:8])]))
        ga_ptr = np.cumsum([0] + [len(g) for g in ga]).astype(np.int64)
        ga_flat = [x for g in ga for x in g]
        tf_ptr = np.array(tf_ptr, dtype=np.int64)
        i64 = lambda x: np.array(x, dtype=np.int64)  # noqa: E731
        return cls(
            ncoef=len(coefficients), nat=nat, bonds=bonds, offsets=np.array(offs, dtype=np.int64).reshape(-1, 3),
            bond_idx=bond_idx, t_coef=i64(t_coef),
            t_weight=np.array(t_weight, dtype=float), tf_ptr=tf_ptr, tf_bond=i64(tf_bond),
            tf_lbond=i64(tf_lbond), tf_power=i64(tf_power), ts_ptr=i64(ts_ptr), ts_voigt=i64(ts_voigt),
            ts_power=i64(ts_power), z_tptr=i64(z_tptr), z_bptr=i64(z_bptr), z_bonds=i64(z_bonds),
            ga_ptr=ga_ptr, ga_bond=i64([x[0] for x in ga_flat]), ga_sign=np.array([x[1] for x in ga_flat], dtype=float),
            ga_negoff=i64([x[2] for x in ga_flat]),
            maxf=int(max(1, np.diff(tf_ptr).max() if len(tf_ptr) > 1 else 1)),
            maxp=int(max([1] + tf_power)), bond_origin=tuple(origin),
        )

    @property
    def nterms(self) -> int:
        return len(self.t_coef)

    def check_supercell(self, mesh):
        """Raise ValueError if some displacement difference vanishes identically on this supercell (both ends are
        the same periodic image): the term would silently be zero."""
        n = np.array(mesh)
        for b, row in enumerate(self.bonds):
            if row[0] == row[4] and np.all(np.mod(row[1:4] - row[5:8], n) == 0):
                z, name = self.bond_origin[b]
                raise ValueError(
                    f"anharmonic coefficient {z} ({name!r}): the difference between atom {row[0]} in cells "
                    f"{tuple(row[1:4])} and {tuple(row[5:8])} is identically zero on a {n[0]}x{n[1]}x{n[2]} "
                    "supercell (both are the same periodic image); use a supercell at least as large as the "
                    "term's range")

    def bond_rows(self, neigh) -> tuple:
        """For every cell c and bond b: the flat force-component index 3 * atom + direction of the bond's first
        (row_a) and second (row_b) atom in the supercell of neighbour table ``neigh``, (ncell, nb) int32 each."""
        if neigh.size and neigh.shape[0] * self.nat * 3 >= 2 ** 31:
            raise ValueError("supercell too large for 32-bit force-component indices")
        b = self.bond_idx
        row_a = 3 * (neigh[:, b[:, 1]] * self.nat + b[None, :, 0]) + b[None, :, 4]
        row_b = 3 * (neigh[:, b[:, 3]] * self.nat + b[None, :, 2]) + b[None, :, 4]
        return np.ascontiguousarray(row_a, dtype=np.int32), np.ascontiguousarray(row_b, dtype=np.int32)

    def neighbour_table(self, mesh) -> np.ndarray:
        """(ncell, no): flat index (C order) of cell c + offsets[o], wrapped into the n1 x n2 x n3 supercell."""
        n = np.array(mesh)
        cells = np.indices(tuple(mesh)).reshape(3, -1).T
        img = np.mod(cells[:, None, :] + self.offsets[None, :, :], n)
        return np.ascontiguousarray((img[..., 0] * n[1] + img[..., 1]) * n[2] + img[..., 2])


#: the "no per-cell energies" arguments of _terms_range
_NO_W = np.zeros(0)
_NO_TAU = np.zeros((0, 0))


@njit(cache=True)
def strain_products(eta, ts_ptr, ts_voigt, ts_power):
    """Per term: product of its strain factors and the derivative of that product w.r.t. each Voigt component."""
    nt = len(ts_ptr) - 1
    sp = np.ones(nt)
    dsp = np.zeros((nt, 6))
    for t in range(nt):
        s0, s1 = ts_ptr[t], ts_ptr[t + 1]
        for k in range(s0, s1):
            v, p = ts_voigt[k], ts_power[k]
            val = 1.0
            der = float(p)
            for _ in range(p - 1):
                der *= eta[v]
            val = der / p * eta[v]
            # derivative of the whole product w.r.t. eta_v: this factor's derivative times the others
            others = 1.0
            for m in range(s0, s1):
                if m != k:
                    q = ts_power[m]
                    x = 1.0
                    for _ in range(q):
                        x *= eta[ts_voigt[m]]
                    others *= x
            dsp[t, v] += der * others
            sp[t] *= val
    return sp, dsp


@njit(cache=True)
def _bond_values_range(uf, nat, neigh, bond_idx, out, c0, c1):
    """out[c, b] = u_a(c + cell_a)_dir - u_b(c + cell_b)_dir; uf is u as (ncell * nat, 3)."""
    nb = bond_idx.shape[0]
    for c in range(c0, c1):
        for b in range(nb):
            d = bond_idx[b, 4]
            out[c, b] = (uf[neigh[c, bond_idx[b, 1]] * nat + bond_idx[b, 0], d]
                         - uf[neigh[c, bond_idx[b, 3]] * nat + bond_idx[b, 2], d])


@njit(cache=True)
def _terms_range(delta, s_t, t_scale, dsp, has_strain, tf_ptr, tf_bond, tf_power, maxf, maxp, gdelta, c0, c1, ge,
                 w_sp, t_coef, tau_c):
    """Energy of terms t = 0..len(s_t)-1 on cells [c0, c1); adds dE/deta to ge and sets gdelta[c0:c1] = dE/dDelta.
    With a tau_c of shape (ncell, nz) (else (0, 0)): adds to tau_c[c, z] each cell's energy of coefficient z at unit
    value (w_sp = weight times strain product per term, t_coef its coefficient): one more multiply-add per term.

    Term t has factors f = tf_ptr[t]..tf_ptr[t+1]-1: bond column tf_bond[f] of delta, power tf_power[f].
    s_t = t_scale * (strain product) per term.  Powers of every bond value are tabulated once per cell; terms
    with one, two or three factors (nearly all of them) take straight-line code (a helper call per term costs
    reference counting and was measured 3x slower).
    """
    nt = len(s_t)
    nb = delta.shape[1]
    want_tau = tau_c.shape[0] > 0
    pw = np.empty((nb, maxp + 1))
    vals = np.empty(maxf)
    dvals = np.empty(maxf)
    pre = np.empty(maxf)
    psum = np.zeros(nt)  # sum over cells of each term's displacement product (for d E / d eta)
    e = 0.0
    for c in range(c0, c1):
        for b in range(nb):
            x = delta[c, b]
            acc = 1.0
            pw[b, 0] = 1.0
            for k in range(1, maxp + 1):
                acc *= x
                pw[b, k] = acc
        g = gdelta[c]
        g[:] = 0.0
        for t in range(nt):
            f0 = tf_ptr[t]
            nf = tf_ptr[t + 1] - f0
            st = s_t[t]
            if nf == 1:
                b0, p0 = tf_bond[f0], tf_power[f0]
                prod = pw[b0, p0]
                g[b0] += st * p0 * pw[b0, p0 - 1]
            elif nf == 2:
                b0, p0 = tf_bond[f0], tf_power[f0]
                b1, p1 = tf_bond[f0 + 1], tf_power[f0 + 1]
                v0, v1 = pw[b0, p0], pw[b1, p1]
                prod = v0 * v1
                g[b0] += st * v1 * p0 * pw[b0, p0 - 1]
                g[b1] += st * v0 * p1 * pw[b1, p1 - 1]
            elif nf == 3:
                b0, p0 = tf_bond[f0], tf_power[f0]
                b1, p1 = tf_bond[f0 + 1], tf_power[f0 + 1]
                b2, p2 = tf_bond[f0 + 2], tf_power[f0 + 2]
                v0, v1, v2 = pw[b0, p0], pw[b1, p1], pw[b2, p2]
                prod = v0 * v1 * v2
                g[b0] += st * v1 * v2 * p0 * pw[b0, p0 - 1]
                g[b1] += st * v0 * v2 * p1 * pw[b1, p1 - 1]
                g[b2] += st * v0 * v1 * p2 * pw[b2, p2 - 1]
            else:
                prod = 1.0
                for k in range(nf):
                    b = tf_bond[f0 + k]
                    p = tf_power[f0 + k]
                    vals[k] = pw[b, p]
                    dvals[k] = p * pw[b, p - 1]
                    pre[k] = prod
                    prod *= vals[k]
                suf = st
                for k in range(nf - 1, -1, -1):
                    g[tf_bond[f0 + k]] += pre[k] * suf * dvals[k]
                    suf *= vals[k]
            e += st * prod
            psum[t] += prod
            if want_tau:
                tau_c[c, t_coef[t]] += w_sp[t] * prod
    for t in range(nt):
        if has_strain[t]:
            for v in range(6):
                ge[v] += t_scale[t] * psum[t] * dsp[t, v]
    return e


@njit(cache=True)
def _gather_range(gdelta, nat, neigh, bond_idx, ga_ptr, ga_bond, ga_sign, ga_negoff, gradf, m0, m1):
    """gradf[m * nat + i, dir] += +-dE/dDelta of every bond touching atom i of cell m (one writer per row)."""
    for m in range(m0, m1):
        for i in range(nat):
            row = m * nat + i
            for k in range(ga_ptr[i], ga_ptr[i + 1]):
                b = ga_bond[k]
                gradf[row, bond_idx[b, 4]] += ga_sign[k] * gdelta[neigh[m, ga_negoff[k]], b]


@njit(parallel=True, cache=True)
def _energy_grad_parallel(uf, nat, neigh, delta, bond_idx, s_t, t_scale, dsp, has_strain, tf_ptr, tf_bond, tf_power,
                          maxf, maxp, ga_ptr, ga_bond, ga_sign, ga_negoff, gdelta, gradf, w_sp, t_coef, tau_c, nchunk):
    ncell = delta.shape[0]
    e_part = np.zeros(nchunk)
    g_part = np.zeros((nchunk, 6))
    for ch in prange(nchunk):  # a cell's terms need only its own row of bond values: one parallel region
        _bond_values_range(uf, nat, neigh, bond_idx, delta, ch * ncell // nchunk, (ch + 1) * ncell // nchunk)
        e_part[ch] = _terms_range(delta, s_t, t_scale, dsp, has_strain, tf_ptr, tf_bond, tf_power, maxf, maxp,
                                  gdelta, ch * ncell // nchunk, (ch + 1) * ncell // nchunk, g_part[ch], w_sp, t_coef,
                                  tau_c)
    for ch in prange(nchunk):
        _gather_range(gdelta, nat, neigh, bond_idx, ga_ptr, ga_bond, ga_sign, ga_negoff, gradf,
                      ch * ncell // nchunk, (ch + 1) * ncell // nchunk)
    return e_part.sum(), g_part.sum(axis=0)


@njit(cache=True)
def _energy_grad_serial(uf, nat, neigh, delta, bond_idx, s_t, t_scale, dsp, has_strain, tf_ptr, tf_bond, tf_power,
                        maxf, maxp, ga_ptr, ga_bond, ga_sign, ga_negoff, gdelta, gradf, w_sp, t_coef, tau_c):
    ncell = delta.shape[0]
    ge = np.zeros(6)
    _bond_values_range(uf, nat, neigh, bond_idx, delta, 0, ncell)
    e = _terms_range(delta, s_t, t_scale, dsp, has_strain, tf_ptr, tf_bond, tf_power, maxf, maxp, gdelta, 0, ncell,
                     ge, w_sp, t_coef, tau_c)
    _gather_range(gdelta, nat, neigh, bond_idx, ga_ptr, ga_bond, ga_sign, ga_negoff, gradf, 0, ncell)
    return e, ge


def energy_grad(u, terms: CompiledTerms, neigh, t_scale, sp, dsp, has_strain, grad_u, parallel: bool, work=None,
                tau_cells=None):
    """Anharmonic energy; adds dE/du to grad_u (n1,n2,n3,nat,3).  Returns (energy, dE/deta (6,), Delta (ncell, nb)).

    neigh: terms.neighbour_table(mesh).  Delta (the bond values) is returned so that design rows can reuse it.
    work: optional (delta, gdelta) buffers of shape (ncell, nb) reused between calls (fresh large arrays cost page
    faults on every call, which was measured to double the time of a 12^3 supercell with two threads).
    tau_cells: optional (ncell, nz) array, set to each cell's energy of each coefficient at unit value (eV; the
    terms anchored in that cell: those whose first bond starts there), in the same pass: sum over cells = tau.
    """
    if not grad_u.flags.c_contiguous:
        raise ValueError("grad_u must be C-contiguous (it is updated in place)")
    ncell = u.shape[0] * u.shape[1] * u.shape[2]
    nat = terms.nat
    if work is None:
        work = (np.empty((ncell, len(terms.bonds))), np.empty((ncell, len(terms.bonds))))
    delta, gdelta = work
    args = (u.reshape(-1, 3), nat, neigh, delta, terms.bond_idx, t_scale * sp, t_scale, dsp, has_strain,
            terms.tf_ptr, terms.tf_bond, terms.tf_power, terms.maxf, terms.maxp, terms.ga_ptr, terms.ga_bond,
            terms.ga_sign, terms.ga_negoff, gdelta, grad_u.reshape(-1, 3))
    if tau_cells is None:
        args += (_NO_W, terms.t_coef, _NO_TAU)
    else:
        if tau_cells.shape != (ncell, terms.ncoef):
            raise ValueError(f"tau_cells must have shape {(ncell, terms.ncoef)}, got {tau_cells.shape}")
        tau_cells[...] = 0.0
        args += (terms.t_weight * sp, terms.t_coef, tau_cells)
    if parallel:
        e, ge = _energy_grad_parallel(*args, min(ncell, 4 * numba.get_num_threads()))
    else:
        e, ge = _energy_grad_serial(*args)
    return float(e), ge, delta


@njit(cache=True)
def _design_one(z, delta, nat, neigh, bond_idx, t_weight, sp, dsp, has_strain, tf_ptr, tf_lbond, tf_power, z_tptr,
                z_bptr, z_bonds, maxf, maxp, e_rows, geta_rows, gu_rows):
    """Row of coefficient z: tau_z, d tau_z / d eta and d tau_z / d u (scattered into gu_rows[z], (N, 3)).

    The terms of z alone, on the bond columns they use (tf_lbond), through the same kernel as the energy."""
    ncell = delta.shape[0]
    b0 = z_bptr[z]
    nbz = z_bptr[z + 1] - b0
    t0, t1 = z_tptr[z], z_tptr[z + 1]
    delta_z = np.empty((ncell, nbz))
    for c in range(ncell):
        for lb in range(nbz):
            delta_z[c, lb] = delta[c, z_bonds[b0 + lb]]
    gd = np.zeros((ncell, nbz))
    w = t_weight[t0:t1]
    e_rows[z] = _terms_range(delta_z, w * sp[t0:t1], w, dsp[t0:t1], has_strain[t0:t1], tf_ptr[t0:t1 + 1], tf_lbond,
                             tf_power, maxf, maxp, gd, 0, ncell, geta_rows[z], w, tf_lbond, np.zeros((0, 0)))
    for lb in range(nbz):
        b = z_bonds[b0 + lb]
        a, oa, ib, ob, d = bond_idx[b, 0], bond_idx[b, 1], bond_idx[b, 2], bond_idx[b, 3], bond_idx[b, 4]
        for c in range(ncell):
            g = gd[c, lb]
            if g != 0.0:
                gu_rows[z, neigh[c, oa] * nat + a, d] += g
                gu_rows[z, neigh[c, ob] * nat + ib, d] -= g


@njit(parallel=True, cache=True)
def _design_parallel(delta, nat, neigh, bond_idx, t_weight, sp, dsp, has_strain, tf_ptr, tf_lbond, tf_power, z_tptr,
                     z_bptr, z_bonds, maxf, maxp, e_rows, geta_rows, gu_rows):
    for z in prange(len(z_tptr) - 1):
        _design_one(z, delta, nat, neigh, bond_idx, t_weight, sp, dsp, has_strain, tf_ptr, tf_lbond, tf_power, z_tptr,
                    z_bptr, z_bonds, maxf, maxp, e_rows, geta_rows, gu_rows)


@njit(cache=True)
def _design_serial(delta, nat, neigh, bond_idx, t_weight, sp, dsp, has_strain, tf_ptr, tf_lbond, tf_power, z_tptr,
                   z_bptr, z_bonds, maxf, maxp, e_rows, geta_rows, gu_rows):
    for z in range(len(z_tptr) - 1):
        _design_one(z, delta, nat, neigh, bond_idx, t_weight, sp, dsp, has_strain, tf_ptr, tf_lbond, tf_power, z_tptr,
                    z_bptr, z_bonds, maxf, maxp, e_rows, geta_rows, gu_rows)


def design_rows(delta, terms: CompiledTerms, neigh, sp, dsp, has_strain, mesh, parallel: bool):
    """tau (nz,), d tau / d eta (nz, 6) and d tau / d u (nz, n1, n2, n3, nat, 3) of every coefficient at unit value."""
    nz = terms.ncoef
    tau = np.zeros(nz)
    geta = np.zeros((nz, 6))
    gu = np.zeros((nz, delta.shape[0] * terms.nat, 3))
    fn = _design_parallel if parallel else _design_serial
    fn(delta, terms.nat, neigh, terms.bond_idx, terms.t_weight, sp, dsp, has_strain, terms.tf_ptr, terms.tf_lbond, terms.tf_power,
       terms.z_tptr, terms.z_bptr, terms.z_bonds, terms.maxf, terms.maxp, tau, geta, gu)
    return tau, geta, gu.reshape((nz,) + tuple(mesh) + (terms.nat, 3))


#: coefficients per block of the error rows (their rows stay in cache while the cells are swept)
ERROR_BLOCK = 8


def _error_blocks(terms: CompiledTerms, block: int):
    """Blocks of ``block`` consecutive coefficients: the union of their bonds (global indices, blk_bonds[
    blk_bptr[k]:blk_bptr[k+1]]) and, for every factor of every term, the index of its bond in that union
    (tf_blbond).  Cached on ``terms``."""
    cache = terms.__dict__.setdefault("_error_blocks", {})
    if block in cache:
        return cache[block]
    nz = terms.ncoef
    z_edges = np.arange(0, nz + block, block).clip(max=nz)
    z_edges = np.unique(z_edges)
    blk_bptr, blk_bonds = [0], []
    tf_blbond = np.zeros(len(terms.tf_bond), dtype=np.int64)
    for z0, z1 in zip(z_edges[:-1], z_edges[1:]):
        f0, f1 = terms.tf_ptr[terms.z_tptr[z0]], terms.tf_ptr[terms.z_tptr[z1]]
        union, local = np.unique(terms.tf_bond[f0:f1], return_inverse=True)
        tf_blbond[f0:f1] = local
        blk_bonds.extend(union.tolist())
        blk_bptr.append(len(blk_bonds))
    out = (z_edges.astype(np.int64), np.array(blk_bptr, dtype=np.int64), np.array(blk_bonds, dtype=np.int64),
           tf_blbond)
    cache[block] = out
    return out


@njit(cache=True)
def _error_rows_blocks(delta, row_a, row_b, s_t, tf_ptr, tf_blbond, tf_lbond, tf_power, z_tptr, z_bptr, z_bonds,
                       maxp, z_edges, blk_bptr, blk_bonds, k0, k1, psum, rows):
    """Blocks k0..k1-1 of coefficients (their rows only: blocks never write the same memory).  Per term the sum
    over cells of its displacement product (psum), per coefficient the force rows d tau_z / d u (rows, (nz, ncell *
    nat * 3)).

    Block by block, the cells are swept once: the powers of the block's bond values are tabulated per cell, each
    coefficient's terms add their gradient to its own bonds (tf_lbond), which is scattered to the two atoms of each
    bond.  A block's rows (a few hundred kB on a 12^3 cell) stay in cache while the sweep writes them in cell order."""
    ncell = delta.shape[0]
    maxu, maxb = 1, 1
    for k in range(k0, k1):
        maxu = max(maxu, blk_bptr[k + 1] - blk_bptr[k])
    for z in range(z_edges[k0], z_edges[k1]):
        maxb = max(maxb, z_bptr[z + 1] - z_bptr[z])
    pw = np.empty((maxu, maxp + 1))
    hz = np.empty(maxb)
    for k in range(k0, k1):
        u0, nu = blk_bptr[k], blk_bptr[k + 1] - blk_bptr[k]
        for c in range(ncell):
            for lb in range(nu):
                x = delta[c, blk_bonds[u0 + lb]]
                acc = 1.0
                pw[lb, 0] = 1.0
                for q in range(1, maxp + 1):
                    acc *= x
                    pw[lb, q] = acc
            for z in range(z_edges[k], z_edges[k + 1]):
                b0 = z_bptr[z]
                nbz = z_bptr[z + 1] - b0
                for lb in range(nbz):
                    hz[lb] = 0.0
                for t in range(z_tptr[z], z_tptr[z + 1]):
                    f0 = tf_ptr[t]
                    nf = tf_ptr[t + 1] - f0
                    st = s_t[t]
                    if nf == 1:
                        lb0, p0 = tf_blbond[f0], tf_power[f0]
                        psum[t] += pw[lb0, p0]
                        hz[tf_lbond[f0]] += st * p0 * pw[lb0, p0 - 1]
                    elif nf == 2:
                        lb0, p0 = tf_blbond[f0], tf_power[f0]
                        lb1, p1 = tf_blbond[f0 + 1], tf_power[f0 + 1]
                        v0, v1 = pw[lb0, p0], pw[lb1, p1]
                        psum[t] += v0 * v1
                        hz[tf_lbond[f0]] += st * v1 * p0 * pw[lb0, p0 - 1]
                        hz[tf_lbond[f0 + 1]] += st * v0 * p1 * pw[lb1, p1 - 1]
                    else:
                        prod = 1.0
                        for q in range(nf):
                            prod *= pw[tf_blbond[f0 + q], tf_power[f0 + q]]
                        psum[t] += prod
                        for q in range(nf):
                            lq, p = tf_blbond[f0 + q], tf_power[f0 + q]
                            others = 1.0
                            for m in range(nf):
                                if m != q:
                                    others *= pw[tf_blbond[f0 + m], tf_power[f0 + m]]
                            hz[tf_lbond[f0 + q]] += st * others * p * pw[lq, p - 1]
                for lb in range(nbz):
                    h = hz[lb]
                    if h == 0.0:
                        continue
                    b = z_bonds[b0 + lb]
                    rows[z, row_a[c, b]] += h
                    rows[z, row_b[c, b]] -= h


@njit(parallel=True, cache=True)
def _error_rows_parallel(delta, row_a, row_b, s_t, tf_ptr, tf_blbond, tf_lbond, tf_power, z_tptr, z_bptr, z_bonds,
                         maxp, z_edges, blk_bptr, blk_bonds, psum, rows):
    for k in prange(len(z_edges) - 1):
        _error_rows_blocks(delta, row_a, row_b, s_t, tf_ptr, tf_blbond, tf_lbond, tf_power, z_tptr, z_bptr, z_bonds,
                           maxp, z_edges, blk_bptr, blk_bonds, k, k + 1, psum, rows)


def error_rows(u, delta, terms: CompiledTerms, neigh, sp, dsp, has_strain, parallel: bool, out=None,
               bond_rows=None):
    """What the Bayesian errors of a frame need, in one sweep and without the per-coefficient recomputation of
    :func:`design_rows`: tau (nz,), d tau / d eta (nz, 6), the virial rows sum_i d tau_z / d u_i (x) u_i
    (nz, 3, 3) eV, and the force rows d tau / d u (nz, ncell * nat, 3).  ``delta``: the bond values that
    :func:`energy_grad` returned for the same u.  ``out``: a (nz, ncell * nat, 3) buffer to reuse (zeroed here;
    a fresh 30-80 MB array costs page faults on every call); ``bond_rows``: ``terms.bond_rows(neigh)``, made
    once per supercell by the caller.  Units: eV, Angstrom."""
    nz = terms.ncoef
    ncell = delta.shape[0]
    psum = np.zeros(terms.nterms)
    shape = (nz, ncell * terms.nat, 3)
    if out is None or out.shape != shape:
        out = np.zeros(shape)
    else:
        out[...] = 0.0
    z_edges, blk_bptr, blk_bonds, tf_blbond = _error_blocks(terms, ERROR_BLOCK)
    row_a, row_b = bond_rows if bond_rows is not None else terms.bond_rows(neigh)
    args = (delta, row_a, row_b, terms.t_weight * sp, terms.tf_ptr, tf_blbond, terms.tf_lbond, terms.tf_power,
            terms.z_tptr, terms.z_bptr, terms.z_bonds, terms.maxp, z_edges, blk_bptr, blk_bonds)
    flat = out.reshape(nz, -1)
    if nz:
        if parallel and len(z_edges) > 2:
            _error_rows_parallel(*args, psum, flat)
        else:
            _error_rows_blocks(*args, 0, len(z_edges) - 1, psum, flat)
    wp = terms.t_weight * psum
    tau = np.bincount(terms.t_coef, weights=wp * sp, minlength=nz)
    geta = np.zeros((nz, 6))
    np.add.at(geta, terms.t_coef, (wp * has_strain)[:, None] * dsp)
    # sum_i d tau_z / d u_i (x) u_i: one batched product (in the sweep it cost as much as the rows themselves)
    vir = np.matmul(out.transpose(0, 2, 1), np.ascontiguousarray(u).reshape(-1, 3))
    return tau, geta, vir, out
