"""MULTIBINIT file formats: the system XML (``<System_definition>``), the coefficient XML (``<Heff_definition>``)
and the ``_HIST.nc`` trajectories multibinit writes.

MULTIBINIT speaks Hartree and bohr; everything is converted to eV and Angstrom here, at the edge, with the
constants of ``sp_server.units``.  Conventions (checked against multibinit 9.6.2 by tests/io):
* ``<unit_cell>``: the lattice vectors are the *columns* (ABINIT's rprimd(:, i)); HIST files store them as rows;
* ``<elastic units="hartree">`` holds C_ab * V_ref (energy per reference cell);
* ``<local_force_constant>`` blocks are short-range IFCs d2E/du(0)du(R), rows (atom, direction) of the home
  cell, columns (atom, direction) of cell R; ``<total_force_constant>`` the same with the dipole-dipole part;
* ``<borncharge>``: row a, column g holds dP_g/du_a (the transpose of our Z[g, a]);
* ``<strain_coupling voigt=v><correction_force>`` is the strain-phonon coupling Lambda = d2E/du deta_v (what
  multibinit prints from a DDB: minus anaddb's force-response internal strain), so E_sp = sum Lambda u eta, which
  reproduces anaddb's relaxed-ion elastic constants (tests/io/test_ddb_real.py).  multibinit 9.6.2 itself applies
  *half* of it in its dynamics (energies and forces agree with E_sp = 1/2 sum Lambda u eta to 1e-9 on the CaTiO3
  tutorial DDB; tests/io/test_multibinit_catio3.py); only ``exact=True`` reproduces that;
* ``<strain_coupling voigt=v><correction_force_constant>`` blocks (cell R, rows of the home cell) are the
  strain-dependent force constants dPhi(R)/deta_v, read as the Taylor term E = sum_v eta_v u.dPhi_v.u / 2
  (HarmonicPart.strain_ifc).  multibinit 9.6.2 evaluates them inconsistently (energy 1/6, gradient 1/2 on the
  first atom only, strain derivative 1/2, and a mis-shaped cell-index array in
  anharmonics_terms_evaluateIFCStrainCoupling), so no parity is possible and the exact mode refuses them;
  ``<correction_strain_force_constant>``, which multibinit never reads, is refused when non-zero;
* coefficient values are in Hartree / bohr^(displacement order); strain Voigt indices 1..6.
Every malformed input raises MultibinitFormatError naming the file, the element and the problem.
"""
from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import numpy as np
from ase.data import atomic_masses

from ..model.model import HarmonicPart, Model, Reference
from ..model.terms import AnharmonicPart, Coefficient, DisplacementDiff, StrainFactor, Term
from ..units import BOHR_A, HARTREE_EV

_DIRS = {"x": 0, "y": 1, "z": 2}
# A voigt index v in MULTIBINIT's coefficient files multiplies eta_v with this factor to give our engineering
# Voigt strain (1 for the normal components; see docs/multibinit.md for how the shear factor was established)
SHEAR_FACTOR = 1.0


class MultibinitFormatError(ValueError):
    """Malformed or unsupported MULTIBINIT file: the message names the file, the element and the problem."""


def _parse(path) -> ET.Element:
    path = Path(path)
    if not path.exists():
        raise MultibinitFormatError(f"{path}: no such file")
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise MultibinitFormatError(f"{path}: malformed XML ({exc})") from None


def _numbers(path, elem, name, shape=None):
    if elem is None:
        raise MultibinitFormatError(f"{path}: missing <{name}>")
    try:
        arr = np.array((elem.text or "").replace("D", "E").replace("d", "e").split(), dtype=float)
    except ValueError:
        raise MultibinitFormatError(f"{path}: <{name}> contains non-numeric text") from None
    if shape is not None:
        if arr.size != int(np.prod(shape)):
            raise MultibinitFormatError(f"{path}: <{name}> has {arr.size} numbers, expected {int(np.prod(shape))}")
        arr = arr.reshape(shape)
    if not np.all(np.isfinite(arr)):
        raise MultibinitFormatError(f"{path}: <{name}> contains non-finite numbers")
    return arr


def _unit(path, elem, expected):
    unit = elem.get("units")
    if unit is not None and unit.strip() not in expected:
        raise MultibinitFormatError(f"{path}: <{elem.tag}> has units {unit!r}, expected one of {sorted(expected)}")


def _mass_to_number(mass: float) -> int:
    """Atomic number of the element whose standard mass is closest (MULTIBINIT files carry masses, not symbols)."""
    z = int(np.argmin(np.abs(atomic_masses[1:] - mass))) + 1
    if abs(atomic_masses[z] - mass) > 0.05:
        raise ValueError(f"mass {mass} amu matches no element")
    return z


# multibinit 9.6.2 applies half of the printed strain coupling (<correction_force>) in its dynamics: the
# multibinit-exact import keeps that factor (HarmonicPart.conservative False marks such a model)
MULTIBINIT_STRAIN_COUPLING_FACTOR = 0.5


def _closed_under_inversion(cells) -> tuple[list, list]:
    """The lattice translations ``cells`` (tuples) and their opposites, sorted, and for each the index of its
    opposite (for Phi(R) = Phi(-R)^T)."""
    out = sorted(set(cells) | {tuple(-x for x in c) for c in cells})
    where = {c: k for k, c in enumerate(out)}
    return out, [where[tuple(-x for x in c)] for c in out]


# --------------------------------------------------------------------------------------------- system XML
def read_system_xml(path, *, numbers=None, exact: bool = False) -> tuple[Reference, HarmonicPart, dict]:
    """Read a MULTIBINIT ``<System_definition>`` file into our Reference and HarmonicPart (eV, Angstrom).

    ``numbers``: atomic numbers of the atoms (the file has only masses; by default deduced from them).
    ``exact``: keep the force-constant blocks as printed, as multibinit applies them (HarmonicPart.conservative
    False: not symmetrised, the sum rule not imposed); by default they are symmetrised, Phi(R) = Phi(-R)^T, and the
    acoustic sum rule restored, so that forces are exactly -dE/du.
    Returns (reference, harmonic, info) where info reports e.g. the IFC asymmetry that was symmetrised away.
    """
    path = Path(path)
    root = _parse(path)
    if root.tag != "System_definition":
        raise MultibinitFormatError(f"{path}: root element is <{root.tag}>, expected <System_definition>")
    energy = float(_numbers(path, root.find("energy"), "energy", (1,))[0]) * HARTREE_EV
    uc = root.find("unit_cell")
    if uc is not None:
        _unit(path, uc, {"bohrradius"})
    cell = _numbers(path, uc, "unit_cell", (3, 3)).T * BOHR_A  # the file's columns are the lattice vectors
    atoms = root.findall("atom")
    if not atoms:
        raise MultibinitFormatError(f"{path}: no <atom> elements")
    nat = len(atoms)
    masses, pos, born = [], [], []
    for k, a in enumerate(atoms):
        try:
            masses.append(float(a.get("mass")))
        except (TypeError, ValueError):
            raise MultibinitFormatError(f"{path}: <atom> {k} has no valid mass attribute") from None
        p = a.find("position")
        if p is not None:
            _unit(path, p, {"bohrradius"})
        pos.append(_numbers(path, p, f"atom {k} position", (3,)) * BOHR_A)
        z = a.find("borncharge")
        # the file's rows are the displacement directions: Z[g, a] = dP_g/du_a is its transpose (checked on the
        # non-symmetric charges of Pnma CaTiO3 against multibinit's own energies)
        born.append(None if z is None else _numbers(path, z, f"atom {k} borncharge", (3, 3)).T)
    if numbers is None:
        try:
            numbers = [_mass_to_number(m) for m in masses]
        except ValueError as exc:
            raise MultibinitFormatError(f"{path}: {exc}; pass the atomic numbers explicitly") from None
    reference = Reference(cell, np.array(pos), numbers, masses, energy)

    eps_el = root.find("epsilon_inf")
    has_born = all(b is not None for b in born)
    if any(b is not None for b in born) and not has_born:
        raise MultibinitFormatError(f"{path}: some <atom> elements have <borncharge> and others do not")
    born_arr = np.array(born) if has_born else None
    eps = _numbers(path, eps_el, "epsilon_inf", (3, 3)) if eps_el is not None else None
    if (born_arr is None) != (eps is None):
        raise MultibinitFormatError(f"{path}: Born charges and <epsilon_inf> must come together")

    el = root.find("elastic")
    if el is not None:
        _unit(path, el, {"hartree"})
    elastic_cv = _numbers(path, el, "elastic", (6, 6))
    elastic_cv = 0.5 * (elastic_cv + elastic_cv.T)
    elastic = elastic_cv * HARTREE_EV / reference.volume

    def blocks(tag):
        out = {}
        for k, blk in enumerate(root.findall(tag)):
            cell_r = tuple(int(round(x)) for x in _numbers(path, blk.find("cell"), f"{tag} {k} cell", (3,)))
            data = blk.find("data")
            if data is not None:
                _unit(path, blk, {"hartree/bohrradius**2"})
            mat = _numbers(path, data, f"{tag} {k} data", (3 * nat, 3 * nat))
            if cell_r in out:
                raise MultibinitFormatError(f"{path}: <{tag}> cell {cell_r} appears twice")
            out[cell_r] = mat.reshape(nat, 3, nat, 3) * HARTREE_EV / BOHR_A ** 2
        return out

    local = blocks("local_force_constant")
    total = blocks("total_force_constant")
    if local and has_born:
        ifc_blocks, kind = local, "local"
    elif total:
        ifc_blocks, kind = total, "total"
        if has_born:
            born_arr = eps = None  # total IFCs already contain the dipole-dipole part of the original supercell
    elif local:
        ifc_blocks, kind = local, "local"
    else:
        raise MultibinitFormatError(f"{path}: no <local_force_constant> or <total_force_constant> blocks")
    # complete the (R, -R) pairs and symmetrise, Phi(R) = Phi(-R)^T: multibinit's own blocks are symmetric only to
    # ~1e-7 relative, and only the symmetric part is a quadratic form (forces = -dE/du exactly)
    cells, opposite = _closed_under_inversion(ifc_blocks)
    zero = np.zeros((nat, 3, nat, 3))
    ifc = np.array([ifc_blocks.get(c, zero) for c in cells])
    sym = 0.5 * (ifc + ifc[opposite].transpose(0, 3, 4, 1, 2))
    asym = float(np.abs(ifc - sym).max())

    strain_blocks = {}
    lam = np.zeros((nat, 3, 6))
    lam_factor = MULTIBINIT_STRAIN_COUPLING_FACTOR if exact else 1.0
    for k, sc in enumerate(root.findall("strain_coupling")):
        try:
            v = int(sc.get("voigt"))
        except (TypeError, ValueError):
            raise MultibinitFormatError(f"{path}: <strain_coupling> {k} has no valid voigt attribute") from None
        if not 0 <= v <= 5:
            raise MultibinitFormatError(f"{path}: <strain_coupling> voigt={v} outside 0..5")
        cf = sc.find("correction_force")
        if cf is not None:
            _unit(path, cf, {"hartree/bohrradius"})
            lam[:, :, v] = lam_factor * _numbers(path, cf, f"strain_coupling {v} correction_force",
                                                 (nat, 3)) * HARTREE_EV / BOHR_A
        for k, blk in enumerate(sc.findall("correction_force_constant")):
            _unit(path, blk, {"hartree/bohrradius**2"})
            cell_s = tuple(int(round(x)) for x in _numbers(path, blk.find("cell"),
                                                           f"strain_coupling {v} correction_force_constant {k} cell", (3,)))
            mat = _numbers(path, blk.find("data"), f"strain_coupling {v} correction_force_constant {k} data",
                           (3 * nat, 3 * nat)).reshape(nat, 3, nat, 3) * HARTREE_EV / BOHR_A ** 2
            if (v, cell_s) in strain_blocks:
                raise MultibinitFormatError(f"{path}: <strain_coupling voigt={v}> <correction_force_constant> cell "
                                            f"{cell_s} appears twice")
            strain_blocks[(v, cell_s)] = mat
        for blk in sc.findall("correction_strain_force_constant"):   # multibinit 9.6.2 does not use it
            d = _numbers(path, blk.find("data"), f"strain_coupling {v} correction_strain_force_constant")
            if np.abs(d).max() > 0:
                raise MultibinitFormatError(
                    f"{path}: <strain_coupling voigt={v}> has non-zero <correction_strain_force_constant>, which "
                    "multibinit 9.6.2 ignores (it applies <correction_force_constant>); refusing to guess its meaning")
    s_cells = s_ifc = None
    if strain_blocks and exact:
        raise MultibinitFormatError(
            f"{path}: <correction_force_constant> (strain-dependent force constants) cannot be reproduced "
            "multibinit-exactly: multibinit 9.6.2 evaluates them with inconsistent factors (energy 1/6, gradient "
            "1/2 on the first atom only, strain derivative 1/2: anharmonics_terms_evaluateIFCStrainCoupling) and "
            "reads the partner cell's indices from a mis-shaped array, so its energies, forces and stresses are not "
            "those of any force field; import without --multibinit-exact (dPhi/deta as a Taylor term, "
            "docs/multibinit.md)")
    if strain_blocks:
        s_cells, opp = _closed_under_inversion({c for _, c in strain_blocks})
        where = {c: k for k, c in enumerate(s_cells)}
        s_ifc = np.zeros((6, len(s_cells), nat, 3, nat, 3))
        for (v, c), mat in strain_blocks.items():
            s_ifc[v, where[c]] = mat   # dPhi(R)/deta_v: E = sum_v eta_v u.dPhi_v.u / 2
        if not exact:   # a quadratic form in u for each strain component, like the force constants
            s_ifc = 0.5 * (s_ifc + s_ifc[:, opp].transpose(0, 1, 4, 5, 2, 3))
        s_cells = np.array(s_cells)
    info = {"ifc_kind": kind, "ifc_asymmetry_eV_A2": asym, "ifc_cells": len(cells),
            "ifc_mode": "multibinit-exact (as printed)" if exact else "symmetrised, sum rule imposed"}
    if exact and kind == "local":
        # multibinit adds the dipole-dipole part recomputed for the supercell to these short-range blocks and
        # imposes its sum rule (asr 2) on the total: each on-site block loses its symmetrised row sum
        # (effective_potential_generateDipDip -> harmonics_terms_applySumRule).  The file holds the blocks from
        # before; the dipole-dipole part's share is taken in sp_server.kernels.ewald (asr="symmetric"), this is the
        # short-range share.  Zero to rounding for most files; a DDB on an 8x8x8 q-mesh (ABINIT's tmulti_l_9_1,
        # SrTiO3) prints 637 of 729 cells and rows that sum to 7e-3 eV/A^2: without it, 1.6e-4 in energy
        if (0, 0, 0) not in ifc_blocks:
            raise MultibinitFormatError(f"{path}: no <local_force_constant> block for cell (0, 0, 0)")
        origin = cells.index((0, 0, 0))
        row = ifc.sum(axis=(0, 3))                         # (nat, 3, 3): sum over cells and partner atoms
        shift = 0.5 * (row + row.transpose(0, 2, 1))
        for i in range(nat):
            ifc[origin, i, :, i, :] -= shift[i]
        info["ifc_onsite_sum_rule_shift_eV_A2"] = float(np.abs(shift).max())
    try:
        if exact:   # as multibinit applies them
            harmonic = HarmonicPart(np.array(cells), ifc, elastic, lam, born_arr, eps, conservative=False,
                                    strain_ifc_cells=s_cells, strain_ifc=s_ifc)
        else:
            harmonic = HarmonicPart(np.array(cells), sym, elastic, lam, born_arr, eps, strain_ifc_cells=s_cells,
                                    strain_ifc=s_ifc)
    except ValueError as exc:
        raise MultibinitFormatError(f"{path}: {exc}") from None
    asr_before = harmonic.asr_violation()
    if not exact:   # symmetrising broke the file's sum rule by ~asym: restore both exactly (with low-symmetry Born
        # charges the short-range part carries minus the dipole-dipole rest: sp_server.io.ddb.harmonic_from_ddb)
        target = None
        if harmonic.has_dipole:
            from ..kernels.ewald import dipole_sum_rule_rest
            target = -dipole_sum_rule_rest(reference.cell, reference.positions, harmonic.born_charges,
                                           harmonic.epsilon_inf)
        asr_before = harmonic.asr_violation(target)
        harmonic.impose_asr(target=target)
    info["ifc_asr_violation_eV_A2" if exact else "ifc_asr_violation_after_symmetrisation_eV_A2"] = asr_before
    return reference, harmonic, info


# --------------------------------------------------------------------------------------------- coefficients
def read_coefficients_xml(path, natoms: int | None = None) -> AnharmonicPart:
    """Read a ``<Heff_definition>`` file; values converted from Ha/bohr^n to eV/A^n."""
    path = Path(path)
    root = _parse(path)
    if root.tag != "Heff_definition":
        raise MultibinitFormatError(f"{path}: root element is <{root.tag}>, expected <Heff_definition>")
    coefs, values = [], []
    for k, ce in enumerate(root.findall("coefficient")):
        label = f"coefficient {ce.get('number', k + 1)}"
        try:
            value = float(ce.get("value").replace("D", "E"))
        except (AttributeError, ValueError):
            raise MultibinitFormatError(f"{path}: {label}: missing or invalid value attribute") from None
        terms = []
        order = None
        for m, te in enumerate(ce.findall("term")):
            where = f"{path}: {label}, term {m + 1}"
            try:
                weight = float(te.get("weight"))
                disps = []
                for de in te.findall("displacement_diff"):
                    ca = tuple(int(x) for x in de.find("cell_a").text.split())
                    cb = tuple(int(x) for x in de.find("cell_b").text.split())
                    disps.append(DisplacementDiff(int(de.get("atom_a")), ca, int(de.get("atom_b")), cb,
                                                  _DIRS[de.get("direction").strip()], int(de.get("power"))))
                strains = []
                for se in te.findall("strain"):
                    v, p = int(se.get("voigt")), int(se.get("power"))
                    strains.append(StrainFactor(v, p))
                    if v > 3:
                        weight *= SHEAR_FACTOR ** p
                term = Term(weight, tuple(disps), tuple(strains))
            except (TypeError, AttributeError, KeyError, ValueError) as exc:
                raise MultibinitFormatError(f"{where}: malformed term ({exc or 'missing attribute'})") from None
            if natoms is not None:
                for d in term.displacements:
                    for a in (d.atom_a, d.atom_b):
                        if not 0 <= a < natoms:
                            raise MultibinitFormatError(
                                f"{where}: atom index {a} outside the reference cell (0..{natoms - 1})")
            if order is None:
                order = term.displacement_order
            elif term.displacement_order != order:  # value is per bohr^order: rescale this term's weight
                term = Term(term.weight * BOHR_A ** (order - term.displacement_order), term.displacements,
                            term.strains)
            terms.append(term)
        if not terms:
            raise MultibinitFormatError(f"{path}: {label} has no <term>")
        coefs.append(Coefficient(tuple(terms), name=ce.get("text", "")))
        values.append(value * HARTREE_EV / BOHR_A ** order)
    if not coefs:
        raise MultibinitFormatError(f"{path}: no <coefficient> elements")
    return AnharmonicPart(coefs, np.array(values))


def _fmt(x):
    return f"{x: .14E}"


def _atomic_write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_coefficients_xml(anharmonic: AnharmonicPart, path) -> Path:
    path = Path(path)
    lines = ['<?xml version="1.0" ?>', "<Heff_definition>"]
    for z, (coef, value) in enumerate(zip(anharmonic.coefficients, anharmonic.values)):
        order = coef.displacement_order
        v = value / HARTREE_EV * BOHR_A ** order
        text = coef.name.replace('"', "'")
        lines.append(f'  <coefficient number="{z + 1}" value="{_fmt(v)}" text="{text}">')
        for t in coef.terms:
            w = t.weight * BOHR_A ** (t.displacement_order - order)  # value is written per bohr^order
            for s in t.strains:
                if s.voigt > 3:
                    w /= SHEAR_FACTOR ** s.power
            lines.append(f'    <term weight="{_fmt(w)}">')
            for d in t.displacements:
                lines.append(f'      <displacement_diff atom_a="{d.atom_a}" atom_b="{d.atom_b}" '
                             f'direction="{"xyz"[d.direction]}" power="{d.power}">')
                lines.append("        <cell_a>%d %d %d</cell_a>" % d.cell_a)
                lines.append("        <cell_b>%d %d %d</cell_b>" % d.cell_b)
                lines.append("      </displacement_diff>")
            for s in t.strains:
                lines.append(f'      <strain power="{s.power}" voigt="{s.voigt}"/>')
            lines.append("    </term>")
        lines.append("  </coefficient>")
    lines.append("</Heff_definition>")
    _atomic_write(path, "\n".join(lines) + "\n")
    return path


def _matrix(mat, indent="  "):
    return "\n".join(indent + " ".join(_fmt(x) for x in row) for row in np.atleast_2d(mat))


def write_system_xml(model: Model, path) -> Path:
    """Write the reference and harmonic part as a ``<System_definition>`` that multibinit reads.

    ``<correction_force>`` holds Lambda = d2E/du deta as multibinit prints it from a DDB (a multibinit-exact model
    gets its printed values back).  multibinit 9.6.2 applies half of it: for a reference with a non-zero
    strain-phonon coupling (no inversion centre at some site) its dynamics then differ from this model's by
    1/2 sum Lambda u eta, and a warning says so."""
    path = Path(path)
    ref, h = model.reference, model.harmonic
    nat = ref.natoms
    lam_factor = 1.0 if h.conservative else MULTIBINIT_STRAIN_COUPLING_FACTOR
    if h.conservative and np.abs(h.internal_strain).max() > 1e-8:
        import warnings
        warnings.warn(f"{path}: the strain-phonon coupling is non-zero (largest {np.abs(h.internal_strain).max():.3g} "
                      "eV/A); multibinit 9.6.2 applies half of the <correction_force> it reads, so its dynamics on "
                      "this file will differ from the model's (docs/multibinit.md)", stacklevel=2)
    lines = ['<?xml version="1.0" ?>', "<System_definition>",
             "  <energy>", f"  {_fmt(ref.energy / HARTREE_EV)}", "  </energy>",
             '  <unit_cell units="bohrradius">', _matrix(ref.cell.T / BOHR_A), "  </unit_cell>"]  # columns
    eps = h.epsilon_inf if h.has_dipole else np.eye(3)
    lines += ['  <epsilon_inf units="epsilon0">', _matrix(eps), "  </epsilon_inf>"]
    lines += ['  <elastic units="hartree">', _matrix(h.elastic * ref.volume / HARTREE_EV), "  </elastic>"]
    for i in range(nat):
        lines.append(f'  <atom mass="{ref.masses[i]:.5f}" massunits="atomicmassunit">')
        lines += ['    <position units="bohrradius">', _matrix(ref.positions[i] / BOHR_A), "    </position>"]
        if h.has_dipole:
            lines += ['    <borncharge units="abs(e)">', _matrix(h.born_charges[i].T), "    </borncharge>"]
        lines.append("  </atom>")
    tag = "local_force_constant" if h.has_dipole else "total_force_constant"
    for R, blk in zip(h.ifc_cells, h.ifc):
        lines += [f'  <{tag} units="hartree/bohrradius**2">', "    <data>",
                  _matrix(blk.reshape(3 * nat, 3 * nat) / HARTREE_EV * BOHR_A ** 2, " "), "    </data>",
                  "    <cell>", "  %d %d %d" % tuple(R), "    </cell>", f"  </{tag}>"]
    for v in range(6):
        lines += [f'  <strain_coupling voigt="{v}">',
                  '    <correction_force units="hartree/bohrradius">',
                  _matrix(h.internal_strain[:, :, v] / lam_factor / HARTREE_EV * BOHR_A), "    </correction_force>"]
        if h.has_strain_ifc:
            for S, blk in zip(h.strain_ifc_cells, h.strain_ifc[v]):
                if np.abs(blk).max() == 0:
                    continue
                lines += ['    <correction_force_constant units="hartree/bohrradius**2">', "    <data>",
                          _matrix(blk.reshape(3 * nat, 3 * nat) / HARTREE_EV * BOHR_A ** 2, " "),
                          "    </data>", "    <cell>", "  %d %d %d" % tuple(S), "    </cell>",
                          "    </correction_force_constant>"]
        lines.append("  </strain_coupling>")
    lines.append("</System_definition>")
    _atomic_write(path, "\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------- trajectories
def read_hist(path) -> list:
    """Frames of a multibinit/abinit ``_HIST.nc`` as ASE Atoms with a SinglePointCalculator (eV, eV/A, eV/A^3)."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from scipy.io import netcdf_file

    path = Path(path)
    try:
        f = netcdf_file(str(path), "r", mmap=False)
    except Exception as exc:
        raise MultibinitFormatError(f"{path}: not a readable NetCDF HIST file ({exc})") from None
    with f:
        v = f.variables
        for key in ("xcart", "rprimd", "etotal", "fcart", "strten", "typat", "znucl"):
            if key not in v:
                raise MultibinitFormatError(f"{path}: missing variable {key!r}")
        typat = np.asarray(v["typat"][:], dtype=int)
        znucl = np.asarray(v["znucl"][:], dtype=float)
        numbers = np.rint(znucl[typat - 1]).astype(int)
        if "amu" in v:
            amu = np.asarray(v["amu"][:], dtype=float)
            masses = amu[typat - 1]
        else:
            masses = None
        frames = []
        for k in range(v["etotal"].shape[0]):
            cell = np.asarray(v["rprimd"][k]) * BOHR_A  # rprimd(:, i) is vector i; stored C-order as rows
            atoms = Atoms(numbers=numbers, positions=np.asarray(v["xcart"][k]) * BOHR_A, cell=cell, pbc=True)
            if masses is not None:
                atoms.set_masses(masses)
            s = np.asarray(v["strten"][k]) * HARTREE_EV / BOHR_A ** 3
            atoms.calc = SinglePointCalculator(atoms, energy=float(v["etotal"][k]) * HARTREE_EV,
                                               forces=np.asarray(v["fcart"][k]) * HARTREE_EV / BOHR_A, stress=s)
            atoms.info["hist_step"] = k
            frames.append(atoms)
    return frames


def multibinit_system_from_ddb(ddb, folder, *, dipdip: bool = True, ngqpt=None, executable=None) -> Path:
    """Let multibinit itself build the harmonic model of a DDB (its q-mesh interpolation, symmetry images, ``asr 2``
    and ``dipdip`` as given) and write it as FOLDER/model_sys.xml (``prt_model 2``); returns that path.
    ``ngqpt``: the DDB's q-mesh (default: read from the DDB, sp_server.io.ddb.read_ddb).  ``executable``: default
    ``multibinit`` on the PATH (Debian: apt-get install abinit).  Takes about a second."""
    import shutil
    import subprocess
    exe = executable or shutil.which("multibinit")
    if exe is None:
        raise FileNotFoundError("multibinit not found on the PATH: the multibinit-exact import lets multibinit build "
                                "the force constants (Debian: apt-get install abinit)")
    ddb = Path(ddb).resolve()
    if ngqpt is None:
        from .ddb import read_ddb
        ngqpt = read_ddb(ddb, asymmetry_tolerance=np.inf).ngqpt
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.in").write_text(f"prt_model = 2\ndipdip = {int(bool(dipdip))}\n"
                                     f"ngqpt = {' '.join(str(int(n)) for n in ngqpt)}\nncell = 1 1 1\ndynamics = 0\n")
    proc = subprocess.run([exe], input=f"model.in\nmodel.abo\n{ddb}\n\n", text=True, capture_output=True,
                          cwd=folder, timeout=3600)
    out = folder / "model_sys.xml"
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"multibinit could not build the model of {ddb} (exit {proc.returncode}; log in "
                           f"{folder}):\n" + "\n".join(tail))
    return out


def import_multibinit(*, ddb=None, system=None, coefficients=None, dipdip: bool = True, name=None,
                      numbers=None, asymmetry_tolerance: Optional[float] = None,
                      multibinit_exact: bool = False) -> Model:
    """A Model from MULTIBINIT files: the harmonic part from a system XML when given, else from a DDB (Fourier
    interpolation of its q-mesh, short-range + dipole-dipole split as MULTIBINIT's ``dipdip 1``); the anharmonic
    part from a coefficient XML (optional: without it the model is harmonic).  ``asymmetry_tolerance``: of the
    DDB's DFPT blocks (sp_server.io.ddb.read_ddb; default ASYMMETRY_TOLERANCE).

    ``multibinit_exact``: the force constants exactly as multibinit applies them (docs/multibinit.md): from a DDB,
    multibinit itself builds them (:func:`multibinit_system_from_ddb`, needs the executable); from a system XML,
    the blocks as printed.  Neither is symmetrised nor given the sum rule (HarmonicPart.conservative False), so
    forces agree with multibinit's to its printed digits, at the price of being -dE/du only to the file's
    asymmetry (~1e-7 relative for BaHfO3)."""
    if system is None and ddb is None:
        raise ValueError("import needs a DDB or a system XML")
    meta = {}
    if system is None and multibinit_exact:
        from .ddb import read_ddb
        d = read_ddb(ddb, asymmetry_tolerance=np.inf)   # multibinit treats the DFPT noise its own way
        with tempfile.TemporaryDirectory(prefix="sp_mbx_") as tmp:
            xml = multibinit_system_from_ddb(ddb, tmp, dipdip=dipdip, ngqpt=d.ngqpt)
            reference, harmonic, info = read_system_xml(
                xml, numbers=d.reference.numbers if numbers is None else numbers, exact=True)
        if not dipdip and harmonic.has_dipole:   # with dipdip 0 multibinit prints the whole IFC as local blocks
            h = harmonic
            harmonic = HarmonicPart(h.ifc_cells, h.ifc, h.elastic, h.internal_strain, conservative=False)
        meta.update(info, source=str(ddb), built_by="multibinit (prt_model 2, asr 2, "
                    f"dipdip {int(bool(dipdip))})")
        source = Path(ddb)
    elif system is not None:
        reference, harmonic, info = read_system_xml(system, numbers=numbers, exact=multibinit_exact)
        meta.update(info, source=str(system))
        if not dipdip and harmonic.has_dipole:
            raise ValueError(f"{system}: short-range force constants without the dipole-dipole part are not a "
                             "model; use the DDB or keep dipdip")
        source = Path(system)
    else:
        from .ddb import ASYMMETRY_TOLERANCE, model_from_ddb
        base = model_from_ddb(ddb, dipdip=dipdip, asymmetry_tolerance=ASYMMETRY_TOLERANCE
                              if asymmetry_tolerance is None else float(asymmetry_tolerance))
        reference, harmonic = base.reference, base.harmonic
        meta.update(base.metadata, source=str(ddb))
        source = Path(ddb)
    anh = read_coefficients_xml(coefficients, reference.natoms) if coefficients else AnharmonicPart()
    if coefficients:
        meta["coefficients"] = str(coefficients)
    return Model(reference, harmonic, anh, name=name or source.stem, metadata=meta)


def export_multibinit(model: Model, prefix) -> tuple[Path, Path]:
    """Write PREFIX_sys.xml and PREFIX_coeffs.xml (Hartree, bohr) that multibinit reads."""
    prefix = str(prefix)
    return (write_system_xml(model, prefix + "_sys.xml"),
            write_coefficients_xml(model.anharmonic, prefix + "_coeffs.xml"))
