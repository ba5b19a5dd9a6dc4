"""ABINIT derivative database (DDB, text format) and the harmonic part of a second-principles model built from it.

The conventions are those of ABINIT 9.6 / anaddb / MULTIBINIT (sources: src/72_response/m_ddb.F90 dtech9 and
ddb_get_dielt_zeff, src/44_abitools/m_dynmat.F90 cart29/cart39, chneu9, wght9, ftifc_q2r, asrif9,
src/77_ddb/m_ifc.F90 ifc_init, src/77_ddb/m_ddb_elast.F90, src/77_ddb/m_ddb_internalstr.F90,
src/78_effpot/m_effective_potential_file.F90 system_ddb2effpot), converted at the edge to sp_server's units
(eV, Angstrom, amu; Voigt strain xx yy zz yz xz xy with engineering shear):

* a DDB entry ``idir1 ipert1 idir2 ipert2 Re Im`` is d2E / d(pert1, idir1) d(pert2, idir2) in Hartree, with
  atomic displacements along the primitive vectors (reduced coordinates), electric fields along the reciprocal
  vectors times 2 pi, strains Cartesian (ipert = natom+3: xx, yy, zz; natom+4: yz, xz, xy);
* reduced -> Cartesian as anaddb's cart29/cart39: displacement index v_cart = gprimd v_red (B^T v, B = rows of
  the reciprocal basis without 2 pi), electric-field index v_cart = rprimd v_red / (2 pi) (A^T v / 2 pi), strain
  index unchanged;
* epsilon_inf = 1 - 4 pi / Omega d2E/dE dE (cart29);  Z*[i, g, a] = zion_i delta_ga + d2E/du_ia dE_g, averaged
  over the two halves (du dE, dE du) as dtech9 does, then charge neutrality imposed as chneu9 with chneut = 1
  (MULTIBINIT's ``system_ddb2effpot`` hard-codes chneut = 1): the violation sum_i Z*_i is removed in equal parts;
* clamped-ion elastic tensor C_vw = d2E/d eta_v d eta_w / Omega (ddb_elast / system_ddb2effpot, no factor on the
  shear components: ABINIT's shear strain perturbation is the engineering one, 2 eps_yz, the same as ours: checked
  against the TA sound velocity of the IFCs in tests/io/test_ddb.py, which gives C44 to 0.3%);
* internal strain Lambda[i, a, v] = d2E / du_ia d eta_v (Cartesian displacement index);
* dynamical matrices C(q)_{ia,jb} = sum_R Phi_{ia,jb}(R) exp(+2 pi i q.R): phase from the cell translation
  only, atoms at the positions written in the DDB (anaddb's ftifc_q2r / ftifc_r2q convention).

Every malformed input raises :class:`DDBFormatError` (a ValueError) naming the file, the line and the problem.
"""
from __future__ import annotations

import itertools
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..model.model import HarmonicPart, Model, Reference
from ..units import BOHR_A, HARTREE_EV

__all__ = ["DDB", "DDBFormatError", "read_ddb", "unfold_qmesh", "harmonic_from_ddb", "model_from_ddb",
           "harmonic_dynamical_matrices", "phonon_frequencies"]

#: Ha/bohr^2 -> eV/A^2
_IFC = HARTREE_EV / BOHR_A ** 2
#: largest perturbation index beyond natom that a DDB may hold (ABINIT 9: natom+1 .. natom+11)
_MAX_EXTRA_PERT = 11
#: DFPT blocks are symmetric only to the calculation's convergence (1e-6..1e-4 of their largest element for BaHfO3;
#: up to 5% for the PAW CaTiO3 DDB of ABINIT's multibinit tutorial, whose two Born-charge halves and whose symmetry
#: images at the zone boundary differ by 4-5%): they are symmetrised, as anaddb does; an asymmetry beyond this
#: fraction of the block's largest element points at a broken file and is refused (read_ddb(asymmetry_tolerance=...),
#: sp-server import --asymmetry-tolerance)
ASYMMETRY_TOLERANCE = 0.1


class DDBFormatError(ValueError):
    """Malformed, truncated or inconsistent DDB: the message names the file, the line and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# low-level parsing
# ----------------------------------------------------------------------------------------------------------------
_BLOCK_RE = re.compile(r"^\s*(?P<kind>\S.*?)\s*-\s*#\s*elements\s*:\s*(?P<n>\d+)\s*$")
_KEY_RE = re.compile(r"^\s*(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s+(?P<rest>\S.*)$")
_BLOCK_KINDS = {
    "total energy": "etot",
    "1st derivatives": "d1",
    "2nd derivatives (non-stat.)": "d2ns",
    "2nd derivatives (stationary)": "d2st",
    "2nd derivatives (dynamical)": "d2dyn",
    "3rd derivatives": "d3",
    "3rd derivatives (long wave)": "d3lw",
}
_POTENTIAL_MARKERS = ("description of the potentials", "description of the paw", "no information on the potentials")


_FORTRAN_3DIGIT_EXP = re.compile(r"^([+-]?(?:\d+\.\d*|\.\d+))([+-]\d{3})$")


def _float(tok: str) -> float:
    """A Fortran real: 1.0D-02, 1.0E-02, 1.0d-02, or 0.1234-100 (the exponent letter dropped beyond 99)."""
    t = tok.replace("D", "E").replace("d", "e")
    m = _FORTRAN_3DIGIT_EXP.match(t)
    if m:
        t = f"{m.group(1)}E{m.group(2)}"
    try:
        val = float(t)
    except ValueError:
        raise ValueError(f"not a number: {tok!r}") from None
    if not math.isfinite(val):
        raise ValueError(f"non-finite number: {tok!r}")
    return val


def _int(tok: str) -> int:
    try:
        return int(tok)
    except ValueError:
        raise ValueError(f"not an integer: {tok!r}") from None


@dataclass
class _Block:
    kind: str                     # etot, d1, d2ns, d2st, d2dyn, d3, d3lw, other
    title: str
    line: int                     # 1-based line number of the block header
    qpts: list = field(default_factory=list)   # [(q (3,), norm)]
    values: dict = field(default_factory=dict)  # index tuple -> complex

    def q(self, k: int = 0) -> np.ndarray:
        qv, nrm = self.qpts[k]
        return qv / nrm if nrm != 0.0 else qv


@dataclass
class _RawDDB:
    path: str
    version: int
    title: str
    header: dict                  # keyword -> (list of tokens, line number)
    blocks: list


class _Lines:
    """Line cursor with error messages that name the file and the line."""

    def __init__(self, path: str, lines: list):
        self.path = path
        self.lines = lines
        self.pos = 0

    def error(self, msg: str, lineno: Optional[int] = None) -> DDBFormatError:
        where = f"{self.path}, line {lineno}" if lineno is not None else self.path
        return DDBFormatError(f"{where}: {msg}")

    def eof(self) -> bool:
        return self.pos >= len(self.lines)

    def next(self, what: str) -> tuple[int, str]:
        if self.eof():
            raise self.error(f"unexpected end of file while reading {what} (truncated DDB?)")
        self.pos += 1
        return self.pos, self.lines[self.pos - 1]

    def next_nonblank(self, what: str) -> tuple[int, str]:
        while True:
            n, line = self.next(what)
            if line.strip():
                return n, line


def _parse_header(cur: _Lines) -> tuple[int, str, dict]:
    # "**** DERIVATIVE DATABASE ****", "+DDB, Version number    100401", title
    n, line = cur.next_nonblank("the DDB banner")
    if "DERIVATIVE DATABASE" not in line.upper():
        raise cur.error("not an ABINIT DDB text file (no '**** DERIVATIVE DATABASE ****' banner)", n)
    n, line = cur.next_nonblank("the DDB version")
    m = re.search(r"version number\s+(\d+)", line, re.IGNORECASE)
    if m is None:
        raise cur.error(f"expected '+DDB, Version number ...', got {line.strip()!r}", n)
    version = int(m.group(1))
    _, title = cur.next_nonblank("the DDB title")
    header: dict = {}
    key = None
    while True:
        n, line = cur.next("the DDB header")
        text = line.strip()
        low = text.lower()
        if not text:
            continue
        if any(low.startswith(mk) for mk in _POTENTIAL_MARKERS) or "database of total energy derivatives" in low:
            cur.pos -= 1
            break
        toks = text.split()
        m = _KEY_RE.match(line)
        if m and not _is_number(m.group("key")):
            key = m.group("key")
            if key in header:
                raise cur.error(f"header keyword {key!r} appears twice", n)
            header[key] = (m.group("rest").split(), n)
        elif key is not None and all(_is_number(t) for t in toks):
            header[key][0].extend(toks)
        else:
            raise cur.error(f"cannot parse header line {text!r}", n)
    return version, title.strip(), header


def _is_number(tok: str) -> bool:
    try:
        _float(tok)
        return True
    except ValueError:
        return False


def _parse_blocks(cur: _Lines, natom: int) -> list:
    # skip the description of the potentials up to the database banner
    while True:
        n, line = cur.next("the '**** Database of total energy derivatives ****' banner")
        if "database of total energy derivatives" in line.lower():
            break
    n, line = cur.next_nonblank("'Number of data blocks='")
    m = re.search(r"number of data blocks\s*=\s*(\d+)", line, re.IGNORECASE)
    if m is None:
        raise cur.error(f"expected 'Number of data blocks= N', got {line.strip()!r}", n)
    nblocks = int(m.group(1))
    maxpert = natom + _MAX_EXTRA_PERT
    blocks = []
    for ib in range(nblocks):
        what = f"block {ib + 1} of {nblocks}"
        n, line = cur.next_nonblank(what)
        m = _BLOCK_RE.match(line)
        if m is None:
            raise cur.error(f"expected the header of {what} ('<type> - # elements : N'), got {line.strip()!r}", n)
        title = m.group("kind").strip()
        kind = _BLOCK_KINDS.get(title.lower(), "other")
        nel = int(m.group("n"))
        blk = _Block(kind, title, n)
        if kind == "other":
            # unknown block type: skip to the next block header (its content is not needed here)
            while not cur.eof():
                line = cur.lines[cur.pos]
                if _BLOCK_RE.match(line) or "list of bloks" in line.lower():
                    break
                cur.pos += 1
            blocks.append(blk)
            continue
        nq = {"etot": 0, "d1": 0, "d3": 3, "d3lw": 3}.get(kind, 1)
        for _ in range(nq):
            n, line = cur.next_nonblank(f"the q-point of {what}")
            toks = line.split()
            if len(toks) != 5 or toks[0].lower() != "qpt":
                raise cur.error(f"expected 'qpt q1 q2 q3 norm' in {what}, got {line.strip()!r}", n)
            try:
                blk.qpts.append((np.array([_float(t) for t in toks[1:4]]), _float(toks[4])))
            except ValueError as exc:
                raise cur.error(f"bad q-point in {what}: {exc}", n) from None
        nint = {"etot": 0, "d1": 2, "d3": 6, "d3lw": 6}.get(kind, 4)
        for iel in range(nel):
            n, line = cur.next(f"element {iel + 1} of {nel} of {what}")
            toks = line.split()
            if len(toks) != nint + 2:
                if not line.strip() or _BLOCK_RE.match(line):
                    raise cur.error(f"{what} ({title}) declares {nel} elements but has only {iel} "
                                    f"(truncated or malformed DDB)", n)
                raise cur.error(f"element line of {what} should have {nint} integers and 2 numbers, got "
                                f"{line.strip()!r}", n)
            try:
                idx = tuple(_int(t) for t in toks[:nint])
                val = complex(_float(toks[nint]), _float(toks[nint + 1]))
            except ValueError as exc:
                raise cur.error(f"bad element in {what}: {exc}", n) from None
            for k in range(0, nint, 2):
                idir, ipert = idx[k], idx[k + 1]
                if not 1 <= idir <= 3:
                    raise cur.error(f"direction index {idir} out of range 1..3 in {what}", n)
                if not 1 <= ipert <= maxpert:
                    raise cur.error(f"perturbation index {ipert} out of range 1..natom+{_MAX_EXTRA_PERT} = "
                                    f"1..{maxpert} in {what} (inconsistent natom?)", n)
            if idx in blk.values:
                raise cur.error(f"element {idx} repeated in {what}", n)
            blk.values[idx] = val
        blocks.append(blk)
    return blocks


def _parse_ddb(path) -> _RawDDB:
    path = str(path)
    p = Path(path)
    if not p.exists():
        raise DDBFormatError(f"{path}: no such file")
    try:
        text = p.read_text(errors="strict")
    except UnicodeDecodeError:
        raise DDBFormatError(f"{path}: not a text DDB (binary or netCDF DDBs are not supported)") from None
    cur = _Lines(path, text.splitlines())
    version, title, header = _parse_header(cur)
    natom = _header_ints(cur, header, "natom", 1)[0]
    if natom < 1:
        raise cur.error(f"natom = {natom} must be positive", header["natom"][1])
    blocks = _parse_blocks(cur, natom)
    return _RawDDB(path, version, title, header, blocks)


def _header_tokens(cur: _Lines, header: dict, key: str, count: Optional[int]):
    if key not in header:
        raise cur.error(f"header keyword {key!r} is missing")
    toks, line = header[key]
    if count is not None and len(toks) != count:
        raise cur.error(f"header keyword {key!r} has {len(toks)} values, expected {count} "
                        f"(inconsistent natom/ntypat?)", line)
    return toks, line


def _header_ints(cur, header, key, count):
    toks, line = _header_tokens(cur, header, key, count)
    try:
        return [_int(t) for t in toks]
    except ValueError as exc:
        raise cur.error(f"header keyword {key!r}: {exc}", line) from None


def _header_floats(cur, header, key, count):
    toks, line = _header_tokens(cur, header, key, count)
    try:
        return np.array([_float(t) for t in toks])
    except ValueError as exc:
        raise cur.error(f"header keyword {key!r}: {exc}", line) from None


# ----------------------------------------------------------------------------------------------------------------
# the DDB object
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DDB:
    """Contents of an ABINIT DDB in sp_server units (eV, Angstrom, amu), Cartesian coordinates.

    qpoints / dynmats: the q-points (fractional reciprocal coordinates) that have a complete atom-atom block in
    the file (often only the irreducible wedge of the mesh) and their dynamical matrices C(q) (eV/A^2, not mass
    weighted, phase from cell translations only: C(q) = sum_R Phi(R) exp(2 pi i q.R)), as stored: DFPT matrices
    are Hermitian only to their convergence (~1e-5 relative for BaHfO3); unfold_qmesh symmetrises them.
    born_charges: Z[i, g, a] = dP_g / du_a after charge neutrality (chneut = 1, equal repartition, as MULTIBINIT).
    elastic_clamped: eV/A^3, E = V/2 eta.C.eta (engineering shear).  internal_strain: Lambda[i, a, v] =
    d2E/du_ia d eta_v in eV/A, raw (no sum rule; harmonic_from_ddb imposes it with the ASR).
    ngqpt: the Gamma-centred q-mesh the stored q-points belong to, checked to be completely obtainable (with the
    space group of the structure) from the stored points.
    symmetrisation: one dict per symmetrised quantity (quantity, line, largest asymmetry or correction in its
    units, relative to the block's largest element): the DFPT noise that read_ddb removed.
    """

    path: str
    cell: np.ndarray
    positions: np.ndarray
    numbers: np.ndarray
    masses: np.ndarray
    energy: Optional[float]
    qpoints: np.ndarray
    dynmats: np.ndarray
    born_charges: Optional[np.ndarray]
    epsilon_inf: Optional[np.ndarray]
    elastic_clamped: Optional[np.ndarray]
    internal_strain: Optional[np.ndarray]
    ngqpt: tuple
    symmetrisation: list = field(default_factory=list)   # what DFPT noise was symmetrised away (read_ddb)
    asymmetry_tolerance: float = ASYMMETRY_TOLERANCE      # beyond it a block is refused (read_ddb, unfold_qmesh)

    @property
    def reference(self) -> Reference:
        """The DDB's structure as the model's reference cell (energy 0 when the DDB has none)."""
        return Reference(self.cell, self.positions, self.numbers, self.masses, self.energy or 0.0)

    @property
    def natoms(self) -> int:
        return len(self.numbers)


def _pert_kind(ipert: int, natom: int) -> str:
    if ipert <= natom:
        return "atom"
    return {natom + 2: "efield", natom + 3: "strain", natom + 4: "strain"}.get(ipert, "other")


def _block_3x3(blk: _Block, p1: int, p2: int):
    """The 3x3 (idir1, idir2) matrix of perturbations (p1, p2), or None if any element is missing."""
    out = np.empty((3, 3), dtype=complex)
    for a in range(3):
        for b in range(3):
            v = blk.values.get((a + 1, p1, b + 1, p2))
            if v is None:
                return None
            out[a, b] = v
    return out


def _complete_atoms(blk: _Block, natom: int):
    """Atom-atom part (nat,3,nat,3) complex in reduced coordinates, completing a missing element from its
    Hermitian partner; None if still incomplete."""
    d = np.empty((natom, 3, natom, 3), dtype=complex)
    for i in range(natom):
        for a in range(3):
            for j in range(natom):
                for b in range(3):
                    v = blk.values.get((a + 1, i + 1, b + 1, j + 1))
                    if v is None:
                        v = blk.values.get((b + 1, j + 1, a + 1, i + 1))
                        if v is None:
                            return None
                        v = np.conj(v)
                    d[i, a, j, b] = v
    return d


def read_ddb(path, *, ngqpt=None, asymmetry_tolerance: float = ASYMMETRY_TOLERANCE) -> DDB:
    """Read an ABINIT text DDB (any version with the 'Version number' banner, e.g. 100401 of ABINIT 8-9).

    DFPT noise is handled as anaddb does: the dielectric and strain-strain tensors are symmetrised, the two halves
    of the mixed blocks (Born charges, internal strain) averaged, and the Born charges made neutral (chneut 1).
    Each correction is recorded in ``DDB.symmetrisation``; an asymmetry beyond ``asymmetry_tolerance`` x the
    block's largest element is refused (DDBFormatError naming the line) as a sign of a broken file.

    ``ngqpt``: the q-mesh (as anaddb's input variable); by default the smallest Gamma-centred mesh holding every
    stored q-point and its symmetry images.  Either way the whole mesh must be obtainable from the stored points
    with the space group (spglib on the DDB structure) and time reversal, else DDBFormatError."""
    raw = _parse_ddb(path)
    cur = _Lines(raw.path, [])
    h = raw.header
    natom = _header_ints(cur, h, "natom", 1)[0]
    ntypat = _header_ints(cur, h, "ntypat", 1)[0]
    if ntypat < 1:
        raise cur.error(f"ntypat = {ntypat} must be positive", h["ntypat"][1])
    acell = _header_floats(cur, h, "acell", 3)
    rprim = _header_floats(cur, h, "rprim", 9).reshape(3, 3)   # rows: rprim(:,1), rprim(:,2), rprim(:,3)
    amu = _header_floats(cur, h, "amu", ntypat)
    typat = np.array(_header_ints(cur, h, "typat", natom))
    xred = _header_floats(cur, h, "xred", 3 * natom).reshape(natom, 3)
    znucl_all = _header_floats(cur, h, "znucl", None)
    if len(znucl_all) < ntypat:
        raise cur.error(f"header keyword 'znucl' has {len(znucl_all)} values, expected at least ntypat = {ntypat}",
                        h["znucl"][1])
    zion_all = _header_floats(cur, h, "zion", None)
    if len(zion_all) < ntypat:
        raise cur.error(f"header keyword 'zion' has {len(zion_all)} values, expected at least ntypat = {ntypat}",
                        h["zion"][1])
    if np.any(typat < 1) or np.any(typat > ntypat):
        raise cur.error(f"typat {typat.tolist()} out of range 1..ntypat = {ntypat}", h["typat"][1])
    if np.any(acell <= 0):
        raise cur.error(f"acell {acell.tolist()} must be positive", h["acell"][1])
    if np.any(amu <= 0):
        raise cur.error(f"amu {amu.tolist()} must be positive", h["amu"][1])
    a_bohr = acell[:, None] * rprim                # lattice vectors (rows), bohr
    vol_bohr = abs(float(np.linalg.det(a_bohr)))
    if vol_bohr < 1e-8 * float(np.prod(np.linalg.norm(a_bohr, axis=1))):
        raise cur.error("acell * rprim gives a singular cell", h["rprim"][1])
    b_bohr = np.linalg.inv(a_bohr).T                # reciprocal basis (rows) without 2 pi, 1/bohr
    t_atom = b_bohr.T                               # cart <- reduced, displacement index (gprimd)
    t_efield = a_bohr.T / (2.0 * np.pi)             # cart <- reduced, electric-field index (rprimd / 2 pi)
    zion = zion_all[typat - 1]

    def tmat(ipert):
        kind = _pert_kind(ipert, natom)
        return {"atom": t_atom, "efield": t_efield}.get(kind, np.eye(3))

    def cart(m, p1, p2):
        return tmat(p1) @ m @ tmat(p2).T

    cell = a_bohr * BOHR_A
    numbers = np.rint(znucl_all[typat - 1]).astype(int)
    masses = amu[typat - 1].astype(float)

    # ---- total energy
    energy = None
    for blk in raw.blocks:
        if blk.kind == "etot":
            if len(blk.values) != 1:
                raise cur.error(f"block at line {blk.line} ('Total energy') must hold exactly one value")
            energy = float(next(iter(blk.values.values())).real) * HARTREE_EV
            break

    # ---- dynamical matrices: blocks of 2nd derivatives with a complete atom-atom part (non-stationary first,
    # as MULTIBINIT's default rfmeth = 1), one per q-point
    d2blocks = [b for b in raw.blocks if b.kind == "d2ns"] + [b for b in raw.blocks if b.kind in ("d2st", "d2dyn")]
    qlist, dlist, partial_phonon = [], [], []
    for blk in d2blocks:
        d = _complete_atoms(blk, natom)
        if d is None:
            n_atom = sum(1 for k in blk.values if k[1] <= natom and k[3] <= natom)
            if n_atom:
                partial_phonon.append((blk, n_atom))
            continue
        q = blk.q()
        if any(np.allclose(q, q0, atol=1e-8) for q0 in qlist):
            continue
        dc = np.einsum("ax,ixjy,by->iajb", t_atom, d, t_atom) * _IFC
        qlist.append(q)
        dlist.append(dc)
    if not qlist:
        raise cur.error("no block of second derivatives with a complete atom-atom (phonon) part: the DDB holds no "
                        "dynamical matrix")
    for blk, n_atom in partial_phonon:
        if not any(np.allclose(blk.q(), q0, atol=1e-8) for q0 in qlist):
            raise cur.error(f"the block at line {blk.line} (q = {blk.q().tolist()}) has an incomplete phonon part: "
                            f"{n_atom} of the {9 * natom * natom} atom-atom elements (inconsistent natom, or not all "
                            f"atoms perturbed?)")
    qpoints = np.array(qlist)
    dynmats = np.array(dlist)

    # ---- Gamma quantities
    gamma_blocks = [b for b in d2blocks if np.allclose(b.q(), 0.0, atol=1e-10)]

    def find(pairs):
        """First Gamma block holding all 3x3 matrices of the perturbation pairs (or their transposes)."""
        for blk in gamma_blocks:
            mats = []
            for p1, p2 in pairs:
                m = _block_3x3(blk, p1, p2)
                if m is None:
                    mt = _block_3x3(blk, p2, p1)
                    if mt is None:
                        break
                    m = mt.T
                mats.append(m)
            else:
                return blk, mats
        return None, None

    def partial(pairs):
        """Block at Gamma holding some but not all of these elements (to refuse half-present data)."""
        for blk in gamma_blocks:
            for p1, p2 in pairs:
                for a in range(1, 4):
                    for b in range(1, 4):
                        if (a, p1, b, p2) in blk.values or (b, p2, a, p1) in blk.values:
                            return blk
        return None

    symmetrisation = []

    def report(quantity, line, value, scale, unit):
        rel = float(value / scale) if scale > 0 else 0.0
        symmetrisation.append({"quantity": quantity, "line": int(line), "max": float(value), "relative": rel,
                               "unit": unit})
        return rel

    def check(quantity, line, asym, scale, unit):
        """Record an asymmetry that is symmetrised away; refuse one beyond the tolerance."""
        rel = report(quantity, line, asym, scale, unit)
        if rel > asymmetry_tolerance:
            raise cur.error(f"the {quantity} of this block is not symmetric: max asymmetry {asym:.3g} {unit} = "
                            f"{rel:.2e} of its largest element, beyond the tolerance {asymmetry_tolerance:g} (DFPT "
                            f"noise reaches a few percent; a broken file? --asymmetry-tolerance changes the limit)",
                            line)

    flat = dynmats.reshape(len(dynmats), 3 * natom, 3 * natom)
    report("dynamical matrices (Hermitian part kept: harmonic_from_ddb)", d2blocks[0].line,
           np.abs(flat - np.conj(np.swapaxes(flat, -1, -2))).max(), np.abs(flat).max(), "eV/A^2")

    ef = natom + 2
    born = eps = None
    pairs = [(ef, ef)] + [(i, ef) for i in range(1, natom + 1)]
    blk, mats = find(pairs)
    if blk is not None:
        e_cart = cart(mats[0], ef, ef).real
        eps = np.eye(3) - 4.0 * np.pi / vol_bohr * e_cart
        zraw = np.empty((natom, 3, 3))
        born_halves = 0.0
        for i in range(natom):
            halves = []
            m1 = _block_3x3(blk, i + 1, ef)    # (displacement a, field g)
            m2 = _block_3x3(blk, ef, i + 1)    # (field g, displacement a)
            if m1 is not None:
                halves.append(cart(m1, i + 1, ef).real.T)
            if m2 is not None:
                halves.append(cart(m2, ef, i + 1).real)
            if len(halves) == 2:
                born_halves = max(born_halves, np.abs(halves[0] - halves[1]).max())
            zraw[i] = zion[i] * np.eye(3) + np.mean(halves, axis=0)   # [g, a]
        check("Born charges (their two mixed halves)", blk.line, born_halves, np.abs(zraw).max(), "e")
        neutral = zraw.mean(axis=0, keepdims=True)
        report("Born charges (charge neutrality, chneut 1)", blk.line, np.abs(neutral).max(), np.abs(zraw).max(), "e")
        born = zraw - neutral                                             # chneu9, chneut = 1
        check("dielectric tensor", blk.line, np.abs(eps - eps.T).max(), np.abs(eps).max(), "")
        eps = 0.5 * (eps + eps.T)
    elif partial(pairs) is not None:
        b = partial(pairs)
        raise cur.error(f"the Gamma block at line {b.line} has some electric-field derivatives but not the complete "
                        f"dielectric tensor and Born charges of all {natom} atoms")

    st1, st2 = natom + 3, natom + 4
    voigt = [(1, st1), (2, st1), (3, st1), (1, st2), (2, st2), (3, st2)]
    pairs = [(st1, st1), (st1, st2), (st2, st2)]
    elastic = None
    blk, mats = find(pairs)
    if blk is not None:
        c = np.empty((6, 6))
        for v, (da, pa) in enumerate(voigt):
            for w, (db, pb) in enumerate(voigt):
                val = blk.values.get((da, pa, db, pb))
                if val is None:
                    val = blk.values.get((db, pb, da, pa))
                c[v, w] = val.real
        check("strain-strain tensor", blk.line, np.abs(c - c.T).max(), np.abs(c).max(), "Ha")
        elastic = 0.5 * (c + c.T) * HARTREE_EV / (vol_bohr * BOHR_A ** 3)
    elif partial(pairs) is not None:
        raise cur.error(f"the Gamma block at line {partial(pairs).line} has some strain-strain derivatives but not "
                        f"the complete 6x6 elastic tensor")

    pairs = [(i, s) for i in range(1, natom + 1) for s in (st1, st2)]
    internal = None
    blk, mats = find(pairs)
    if blk is not None:
        internal = np.empty((natom, 3, 6))
        internal_halves = 0.0
        for i in range(natom):
            for s, off in ((st1, 0), (st2, 3)):
                halves = []
                m1 = _block_3x3(blk, i + 1, s)
                m2 = _block_3x3(blk, s, i + 1)
                if m1 is not None:
                    halves.append((t_atom @ m1).real)
                if m2 is not None:
                    halves.append((t_atom @ m2.T).real)
                if len(halves) == 2:
                    internal_halves = max(internal_halves, np.abs(halves[0] - halves[1]).max())
                internal[i, :, off:off + 3] = np.mean(halves, axis=0)
        check("internal-strain tensor (its two mixed halves)", blk.line, internal_halves, np.abs(internal).max(),
              "Ha/bohr")
        internal *= HARTREE_EV / BOHR_A
    elif partial(pairs) is not None:
        raise cur.error(f"the Gamma block at line {partial(pairs).line} has some atom-strain derivatives but not the "
                        f"complete internal-strain tensor")

    ddb = DDB(path=raw.path, cell=cell, positions=xred @ cell, numbers=numbers, masses=masses, energy=energy,
              qpoints=qpoints, dynmats=dynmats, born_charges=born, epsilon_inf=eps, elastic_clamped=elastic,
              internal_strain=internal, ngqpt=(0, 0, 0), symmetrisation=symmetrisation,
              asymmetry_tolerance=float(asymmetry_tolerance))
    ops = _space_group(ddb)
    if ngqpt is None:
        ddb.ngqpt = _deduce_mesh(ddb, ops)
    else:
        ddb.ngqpt = tuple(int(n) for n in ngqpt)
        if len(ddb.ngqpt) != 3 or min(ddb.ngqpt) < 1:
            raise ValueError(f"ngqpt must be three positive integers, got {ngqpt!r}")
    _mesh_map(ddb, ops)   # checks that the whole mesh is obtainable
    return ddb


# ----------------------------------------------------------------------------------------------------------------
# symmetry and the full q-mesh
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Op:
    W: np.ndarray        # integer rotation acting on fractional coordinates: x -> W x + t
    S: np.ndarray        # the same rotation in Cartesian coordinates
    perm: np.ndarray     # atom i goes to atom perm[i] ...
    shift: np.ndarray    # ... in cell shift[i]:  W x_i + t = x_perm[i] + shift[i]


def _species(ddb: DDB) -> np.ndarray:
    keys = {}
    return np.array([keys.setdefault((int(z), round(float(m), 6)), len(keys)) for z, m in
                     zip(ddb.numbers, ddb.masses)])


def _space_group(ddb: DDB, symprec: float = 1e-5) -> list:
    import spglib
    if hasattr(spglib, "error") and hasattr(spglib.error, "OLD_ERROR_HANDLING"):
        spglib.error.OLD_ERROR_HANDLING = False
    frac = ddb.reference.scaled_positions
    species = _species(ddb)
    try:
        sym = spglib.get_symmetry((ddb.cell, frac, species), symprec=symprec)
    except Exception as exc:
        raise DDBFormatError(f"{ddb.path}: spglib could not determine the space group: {exc}") from None
    if sym is None:
        raise DDBFormatError(f"{ddb.path}: spglib could not determine the space group")
    at = ddb.cell.T
    ops = []
    for W, t in zip(sym["rotations"], sym["translations"]):
        new = frac @ W.T + t
        perm = np.empty(len(frac), dtype=int)
        shift = np.empty((len(frac), 3), dtype=int)
        for i, x in enumerate(new):
            d = x - frac
            j = np.flatnonzero((np.abs(d - np.round(d)) < 10 * symprec).all(axis=1) & (species == species[i]))
            if len(j) != 1:
                raise DDBFormatError(f"{ddb.path}: a space-group operation does not map the atoms onto themselves")
            perm[i] = j[0]
            shift[i] = np.round(d[j[0]]).astype(int)
        ops.append(_Op(W.astype(int), at @ W @ np.linalg.inv(at), perm, shift))
    return ops


def _denominator(x: float, nmax: int = 64, tol: float = 1e-6) -> int:
    for n in range(1, nmax + 1):
        if abs(x * n - round(x * n)) < tol:
            return n
    raise ValueError(f"q-point component {x!r} is not a fraction with denominator <= {nmax}")


def _images(q: np.ndarray, ops) -> list:
    """All (q', op, time-reversal sign) with q' = s W^-T q (s = +-1)."""
    out = []
    for op in ops:
        qp = np.linalg.solve(op.W.T.astype(float), q)
        out.append((qp, op, 1))
        out.append((-qp, op, -1))
    return out


def _deduce_mesh(ddb: DDB, ops) -> tuple:
    ngqpt = [1, 1, 1]
    for q in ddb.qpoints:
        for qp, _, _ in _images(q, ops):
            for a in range(3):
                try:
                    n = _denominator(qp[a])
                except ValueError as exc:
                    raise DDBFormatError(f"{ddb.path}: q-point {q.tolist()} is not on a Gamma-centred mesh: {exc}") \
                        from None
                ngqpt[a] = ngqpt[a] * n // math.gcd(ngqpt[a], n)
    return tuple(int(n) for n in ngqpt)


def _mesh_map(ddb: DDB, ops) -> dict:
    """For every mesh point k (tuple of ints), the list of (stored index, op, sign) that generate it."""
    mesh = np.array(ddb.ngqpt)
    gen: dict = {}
    for iq, q in enumerate(ddb.qpoints):
        for qp, op, sgn in _images(q, ops):
            k = qp * mesh
            kr = np.round(k)
            if np.abs(k - kr).max() > 1e-6:
                continue
            gen.setdefault(tuple(int(v) for v in np.mod(kr, mesh)), []).append((iq, op, sgn))
    missing = [k for k in np.ndindex(*ddb.ngqpt) if k not in gen]
    if missing:
        ex = ", ".join(str((np.array(k) / mesh).tolist()) for k in missing[:5])
        raise DDBFormatError(
            f"{ddb.path}: the stored q-points ({len(ddb.qpoints)}) do not cover the {ddb.ngqpt[0]}x{ddb.ngqpt[1]}x"
            f"{ddb.ngqpt[2]} q-mesh even with the {len(ops)} space-group operations: {len(missing)} mesh points are "
            f"missing (e.g. {ex}); the DDB must contain the full mesh (or its irreducible wedge)")
    return gen


def _rotate(c: np.ndarray, q: np.ndarray, op: _Op, sgn: int) -> np.ndarray:
    """C(q') from C(q) for q' = sgn W^-T q:  C(W^-T q)_{perm i, perm j} = S C(q)_ij S^T exp(2 pi i W^-T q.(l_j - l_i))
    (l_i = op.shift[i]), then C(-q') = conj C(q') for the time-reversed image (sgn = -1)."""
    qrot = np.linalg.solve(op.W.T.astype(float), q)   # W^-T q
    phase = np.exp(2j * np.pi * (op.shift @ qrot))        # exp(2 pi i q'.l_j)
    rot = np.einsum("ax,ixjy,by->iajb", op.S, c, op.S) * (phase.conj()[:, None, None, None]
                                                           * phase[None, None, :, None])
    out = np.empty_like(rot)
    out[np.ix_(op.perm, range(3), op.perm, range(3))] = rot
    return out.conj() if sgn < 0 else out


def unfold_qmesh(ddb: DDB, *, return_spread: bool = False):
    """Dynamical matrices on the whole ngqpt mesh, obtained from the stored ones with the space group and time
    reversal, C(W^-T q)_{g(i) g(j)} = S C(q)_ij S^T exp(2 pi i W^-T q.(l_j - l_i)) (g(i), l_i: image atom and
    its cell) and C(-q) = conj C(q).  Every mesh point, stored ones included, gets the average over all the
    operations that generate it, so the result is exactly symmetric (little group, time reversal); the largest
    deviation of one image from that average, relative to max |C| (DFPT noise, ~1e-5 for BaHfO3), is returned
    with ``return_spread``, recorded in ``ddb.symmetrisation`` and must stay below ``ddb.asymmetry_tolerance``
    (else the DDB is inconsistent with its structure).

    Returns qpoints (N, 3) in np.ndindex order of the mesh (q = k / ngqpt) and dynmats (N, nat, 3, nat, 3)."""
    ops = _space_group(ddb)
    gen = _mesh_map(ddb, ops)
    mesh = np.array(ddb.ngqpt)
    nat = ddb.natoms
    keys = list(np.ndindex(*ddb.ngqpt))
    out = np.empty((len(keys), nat, 3, nat, 3), dtype=complex)
    scale = np.abs(ddb.dynmats).max()
    spread = 0.0
    for n, k in enumerate(keys):
        # C(q' + G) = C(q') with the cell-translation phase convention, so every image lands on k / N as it is
        mats = [_rotate(ddb.dynmats[iq], ddb.qpoints[iq], op, sgn) for iq, op, sgn in gen[k]]
        avg = np.mean(mats, axis=0)
        spread = max(spread, max(np.abs(m - avg).max() for m in mats))
        out[n] = avg
    if spread > ddb.asymmetry_tolerance * scale:
        raise DDBFormatError(f"{ddb.path}: the dynamical matrices are not consistent with the space group "
                             f"(symmetry images differ by {spread:.3e} eV/A^2, {spread / scale:.1e} relative, beyond "
                             f"the tolerance {ddb.asymmetry_tolerance:g}; --asymmetry-tolerance changes the limit)")
    entry = {"quantity": "dynamical matrices (symmetry images averaged over the q-mesh)", "line": 0,
             "max": float(spread), "relative": float(spread / scale), "unit": "eV/A^2"}
    if entry not in ddb.symmetrisation:
        ddb.symmetrisation.append(entry)
    qpts = np.array(keys, dtype=float) / mesh
    return (qpts, out, spread / scale) if return_spread else (qpts, out)


# ----------------------------------------------------------------------------------------------------------------
# real space
# ----------------------------------------------------------------------------------------------------------------
def _ws_weights(cell: np.ndarray, frac: np.ndarray, mesh) -> tuple[np.ndarray, np.ndarray]:
    """anaddb's wght9 (brav = 1, Wigner-Seitz algorithm): for each atom pair (i, j) and lattice vector R the
    weight 1/n if d = R + x_j - x_i lies in the Wigner-Seitz cell of the supercell lattice (n = 1 + number of
    supercell lattice points equidistant with the origin), 0 outside.  The weights of the images of each pair
    sum to one, so the sum over R is n1 n2 n3.  Returns (cells (nR, 3), weights (nR, nat, nat))."""
    mesh = np.asarray(mesh)
    ntot = int(np.prod(mesh))
    nat = len(frac)
    sup = cell * mesh[:, None]
    grid = np.array([g for g in itertools.product(range(-2, 3), repeat=3) if any(g)])
    lvec = grid @ sup
    half = 0.5 * np.einsum("ij,ij->i", lvec, lvec)
    lim = mesh + 2
    cells = np.array(list(itertools.product(*(range(-l, l + 1) for l in lim))))
    for toldist in (1e-8, 1e-7, 1e-6):           # bohr^2, as wght9 (then escalated as ifc_init does)
        tol = toldist * BOHR_A ** 2
        w = np.zeros((len(cells), nat, nat))
        for i in range(nat):
            for j in range(nat):
                d = (cells + frac[j] - frac[i]) @ cell
                proj = d @ lvec.T - half
                outside = (proj > tol).any(axis=1)
                nreq = 1 + (np.abs(proj) <= tol).sum(axis=1)
                w[:, i, j] = np.where(outside, 0.0, 1.0 / nreq)
        if np.allclose(w.sum(axis=0), ntot, rtol=0, atol=1e-9):
            keep = w.reshape(len(cells), -1).any(axis=1)
            return cells[keep], w[keep]
    raise ValueError(f"Wigner-Seitz weights of the {tuple(mesh)} supercell do not sum to {ntot} for every atom pair "
                     f"(atomic positions not symmetric enough?)")


def _dipole_part(ddb: DDB, qpoints: np.ndarray) -> np.ndarray:
    from ..kernels.ewald import dipole_dipole_matrices
    return dipole_dipole_matrices(ddb.cell, ddb.positions, ddb.born_charges, ddb.epsilon_inf, qpoints,
                                  asr="symmetric")


def _asr_onsite(ifc: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """MULTIBINIT's default asr = 2 (anaddb asrif9): subtract from each on-site block Phi_ii(0) the symmetrised
    row sum 1/2 (S_i + S_i^T), S_i = sum_{j,R} Phi_ij(R).  Returns the corrections (nat, 3, 3)."""
    i0 = int(np.flatnonzero((cells == 0).all(axis=1))[0])
    s = ifc.sum(axis=(0, 3))                          # (nat, 3, 3)
    corr = 0.5 * (s + s.transpose(0, 2, 1))
    for i in range(ifc.shape[1]):
        ifc[i0, i, :, i, :] -= corr[i]
    return corr


def harmonic_from_ddb(ddb: DDB, *, dipdip: bool = True, asr: bool = True):
    """The exact harmonic part (``sp_server.model.HarmonicPart``) from a DDB, as MULTIBINIT 9.6 builds it
    (ifc_init with brav 1, ngqpt = the DDB mesh, nsphere 0, rifcsph 0; system_ddb2effpot):

    1. the dynamical matrices on the whole mesh (unfold_qmesh), made Hermitian;
    2. with ``dipdip`` and Born charges + epsilon: minus the dipole-dipole C_dd(q) (Ewald, with the symmetric
       part of anaddb's q = 0 correction, as multibinit: Hermitian); the model adds C_dd back by Ewald for each
       supercell;
    3. Phi(R) on the supercell lattice by inverse Fourier transform (real part), each R distributed over its
       Wigner-Seitz images with anaddb's weights (wght9), which makes the transform exact on the mesh and keeps
       Phi(R) = Phi(-R)^T;
    4. with ``asr``: the on-site blocks get -1/2 (S_i + S_i^T), S_i = sum_{j,R} Phi_ij(R) (asrif9 with
       MULTIBINIT's default asr 2), and the internal strain the sum rule sum_i Lambda_i = 0 (ddb_internalstr).
       With low-symmetry Born charges the dipole-dipole row sums keep an antisymmetric rest
       (sp_server.kernels.ewald.dipole_sum_rule_rest); the short-range part then carries minus that rest
       (HarmonicPart.impose_asr(target=...)), so that the whole is Hermitian *and* translation invariant, where
       multibinit's own model is not (it removes the resulting net force, mass-weighted, at each step).

    Without ``dipdip`` (or without Born charges) the IFCs are the full ones and the part carries no Born charges.
    A DDB without elastic or internal-strain data gives zeros there, with a warning."""

    nat = ddb.natoms
    mesh = tuple(ddb.ngqpt)
    qpts, dyn = unfold_qmesh(ddb)
    dyn = 0.5 * (dyn + np.conj(dyn.transpose(0, 3, 4, 1, 2)))
    use_dd = bool(dipdip) and ddb.born_charges is not None and ddb.epsilon_inf is not None
    if dipdip and not use_dd:
        warnings.warn(f"{ddb.path}: no Born charges / dielectric tensor in the DDB: no dipole-dipole part",
                      stacklevel=2)
    target = None
    if use_dd:   # what the short-range row sums must be (see 4.; zero to rounding for symmetric Born charges)
        from ..kernels.ewald import dipole_sum_rule_rest
        target = -dipole_sum_rule_rest(ddb.cell, ddb.positions, ddb.born_charges, ddb.epsilon_inf)
        dyn = dyn - _dipole_part(ddb, qpts)
    grid = dyn.reshape(mesh + (nat, 3, nat, 3))
    phi = np.fft.fftn(grid, axes=(0, 1, 2)) / np.prod(mesh)   # Phi_per(m) = 1/N sum_k C(k/N) exp(-2 pi i k.m/N)
    imag = np.abs(phi.imag).max()
    if imag > 1e-6 * np.abs(phi.real).max():
        raise DDBFormatError(f"{ddb.path}: the force constants of the mesh are not real (max imaginary part "
                             f"{imag:.2e} eV/A^2): C(-q) != conj C(q)")
    phi = phi.real
    cells, w = _ws_weights(ddb.cell, ddb.reference.scaled_positions, mesh)
    idx = np.mod(cells, mesh)
    ifc = phi[idx[:, 0], idx[:, 1], idx[:, 2]] * w[:, :, None, :, None]
    elastic = ddb.elastic_clamped
    internal = ddb.internal_strain
    if elastic is None:
        warnings.warn(f"{ddb.path}: no strain-strain derivatives: elastic constants set to zero", stacklevel=2)
        elastic = np.zeros((6, 6))
    if internal is None:
        warnings.warn(f"{ddb.path}: no atom-strain derivatives: internal strain set to zero", stacklevel=2)
        internal = np.zeros((nat, 3, 6))
    internal = np.array(internal, dtype=float)
    if asr:
        _asr_onsite(ifc, cells)
        internal = internal - internal.mean(axis=0, keepdims=True)
    # drop the cells whose blocks vanish (both R and -R, so that the pairs stay complete)
    scale = np.abs(ifc).max()
    small = np.abs(ifc).reshape(len(cells), -1).max(axis=1) <= 1e-12 * scale
    index = {tuple(c): n for n, c in enumerate(cells)}
    keep = np.array([not (small[n] and small[index[tuple(-c)]]) for n, c in enumerate(cells)])
    born = ddb.born_charges if use_dd else None
    eps = ddb.epsilon_inf if use_dd else None
    hp = HarmonicPart(cells[keep], ifc[keep], np.array(elastic, dtype=float), internal, born, eps)
    if asr and hp.asr_violation(target) > 1e-10 * scale:
        hp.impose_asr(target=target)
    return hp


def harmonic_dynamical_matrices(harmonic, reference, qpoints) -> np.ndarray:
    """C(q) = sum_R Phi(R) exp(2 pi i q.R) (+ the dipole-dipole part when the harmonic part has Born charges),
    eV/A^2, (nq, nat, 3, nat, 3), for q in fractional reciprocal coordinates."""
    qpoints = np.atleast_2d(np.asarray(qpoints, dtype=float))
    phase = np.exp(2j * np.pi * qpoints @ harmonic.ifc_cells.T)
    c = np.einsum("qr,riajb->qiajb", phase, harmonic.ifc)
    if harmonic.has_dipole:
        from ..kernels.ewald import dipole_dipole_matrices
        c = c + dipole_dipole_matrices(reference.cell, reference.positions, harmonic.born_charges,
                                       harmonic.epsilon_inf, qpoints, asr="symmetric")   # as the models evaluate
    return c


def phonon_frequencies(dynmats: np.ndarray, masses) -> np.ndarray:
    """Phonon frequencies in cm^-1 (negative for unstable modes), ascending, from C(q) in eV/A^2 and masses in
    amu; dynmats (..., nat, 3, nat, 3).  The matrix is made Hermitian first (as anaddb's dfpt_phfrq)."""
    from ase import units
    dynmats = np.asarray(dynmats)
    nat = dynmats.shape[-2]
    m = np.repeat(np.asarray(masses, dtype=float), 3)
    c = dynmats.reshape(dynmats.shape[:-4] + (3 * nat, 3 * nat)) / np.sqrt(np.outer(m, m))
    c = 0.5 * (c + np.conj(np.swapaxes(c, -1, -2)))
    lam = np.linalg.eigvalsh(c)                           # eV / (A^2 amu)
    omega = np.sqrt(np.abs(lam) * units._e / (1e-20 * units._amu))     # rad/s
    return np.sign(lam) * omega / (2.0 * np.pi * units._c * 100.0)


def model_from_ddb(path, *, dipdip: bool = True, asr: bool = True, name: Optional[str] = None,
                   asymmetry_tolerance: float = ASYMMETRY_TOLERANCE):
    """A Model with the DDB's reference structure and energy and its exact harmonic part (no anharmonic terms).
    A DDB without a total-energy block gives reference energy 0 (noted in ``metadata['notes']``); the DFPT noise
    symmetrised away on reading is in ``metadata['symmetrisation']`` (read_ddb)."""

    ddb = read_ddb(path, asymmetry_tolerance=asymmetry_tolerance)
    notes = []
    energy = ddb.energy
    if energy is None:
        notes.append(f"{ddb.path}: the DDB has no total-energy block: reference energy set to 0")
        energy = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        harmonic = harmonic_from_ddb(ddb, dipdip=dipdip, asr=asr)
    notes.extend(str(w.message) for w in caught)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    ref = ddb.reference
    meta = {
        "source": str(ddb.path),
        "format": "ABINIT DDB",
        "ngqpt": list(ddb.ngqpt),
        "n_stored_qpoints": int(len(ddb.qpoints)),
        "dipdip": bool(dipdip and harmonic.has_dipole),
        "asr": bool(asr),
        "charge_neutrality": "chneut 1 (equal repartition)" if ddb.born_charges is not None else "no Born charges",
        "notes": notes,
        "symmetrisation": ddb.symmetrisation,
    }
    if ddb.born_charges is not None and not harmonic.has_dipole:
        meta["born_charges"] = ddb.born_charges.tolist()
        meta["epsilon_inf"] = ddb.epsilon_inf.tolist()
    return Model(ref, harmonic, name=name or Path(ddb.path).name, metadata=meta)
