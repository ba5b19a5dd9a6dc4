"""The native model file (HDF5, format ``sp_server.model`` version 2): writing, reading and validating it.

Layout (every dataset carries a ``unit`` attribute; see docs/model_format.md):

    /                      attrs: format="sp_server.model", format_version=1, name, model_version, metadata (JSON)
    /reference/cell        (3,3)   Angstrom, lattice vectors as rows
    /reference/positions   (nat,3) Angstrom, Cartesian
    /reference/numbers     (nat,)  atomic numbers
    /reference/masses      (nat,)  amu
    /reference/energy      ()      eV per reference cell
    /harmonic/ifc_cells    (nR,3)  integer lattice translations
    /harmonic/ifc          (nR,nat,3,nat,3) eV/Angstrom^2 (short-range part when born_charges exist)
    /harmonic/elastic      (6,6)   eV/Angstrom^3, Voigt xx yy zz yz xz xy, engineering shear strain
    /harmonic/internal_strain (nat,3,6) eV/Angstrom
    /harmonic/born_charges (nat,3,3) e        (optional, with epsilon_inf)
    /harmonic/epsilon_inf  (3,3)             (optional, with born_charges)
    /harmonic/strain_ifc_cells (nS,3), /harmonic/strain_ifc (6,nS,nat,3,nat,3) eV/Angstrom^2 per unit strain
                           (optional: strain-dependent force constants, MULTIBINIT's correction_force_constant)
    /harmonic attribute conservative (bool, default true): false for engine-exact force constants, applied as
                           stored (non-symmetric, sum rule not imposed; sp-server import --multibinit-exact)
    /anharmonic/values     (nz,)   eV/Angstrom^(displacement order)
    /anharmonic/names      (nz,)   text
    /anharmonic/term_coefficient (nt,) index of the coefficient each term belongs to (non-decreasing)
    /anharmonic/term_weight      (nt,)
    /anharmonic/disp_offsets     (nt+1,) term t owns rows disp[disp_offsets[t]:disp_offsets[t+1]]
    /anharmonic/disp             (nd,10) atom_a, cell_a(3), atom_b, cell_b(3), direction(0..2), power
    /anharmonic/strain_offsets   (nt+1,)
    /anharmonic/strain           (ns,2)  voigt(1..6), power
    /posterior (optional, version 2)     covariance (nz,nz) (eV/A^order)^2, feature_scale (nz,), attrs sigma_v,
                           sigma_w, log_evidence, scales (JSON); stats/A (nz,nz), stats/b (nz,), attrs yy, n_rows,
                           n_structures
Version 1 files (no posterior) are still read.

Files are written to a temporary name, fsync'ed and renamed, so a reader never sees half a file, and a full or
read-only disk leaves the previous version in place (sp_server.io.jsonfile.atomic_path).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np

from ..io.jsonfile import write_bytes
from .model import HarmonicPart, Model, Reference
from .terms import AnharmonicPart, Coefficient, DisplacementDiff, StrainFactor, Term

FORMAT = "sp_server.model"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


class ModelFileError(ValueError):
    """A model file that cannot be read: names the file and the problem."""


def _flatten_terms(coefficients):
    term_coef, term_weight, disp_off, strain_off, disp, strain = [], [], [0], [0], [], []
    for z, coef in enumerate(coefficients):
        for t in coef.terms:
            term_coef.append(z)
            term_weight.append(t.weight)
            for d in t.displacements:
                disp.append([d.atom_a, *d.cell_a, d.atom_b, *d.cell_b, d.direction, d.power])
            for s in t.strains:
                strain.append([s.voigt, s.power])
            disp_off.append(len(disp))
            strain_off.append(len(strain))
    return (
        np.array(term_coef, dtype=np.int64),
        np.array(term_weight, dtype=float),
        np.array(disp_off, dtype=np.int64),
        np.array(disp, dtype=np.int64).reshape(-1, 10),
        np.array(strain_off, dtype=np.int64),
        np.array(strain, dtype=np.int64).reshape(-1, 2),
    )


def _put(group, name, data, unit):
    ds = group.create_dataset(name, data=data)
    ds.attrs["unit"] = unit
    return ds


def save_model(model: Model, path) -> Path:
    """Write ``model`` to ``path`` atomically: the HDF5 file is built in memory, then written to a temporary file in
    the same folder, fsync'ed and renamed (sp_server.io.jsonfile.atomic_path).  A full or read-only disk (or any
    other error) leaves the previous file untouched and no temporary file, and raises an OSError naming ``path``.
    HDF5 never sees the disk here: its own handling of a failed write (ENOSPC) can leave the library in a state
    where the next call crashes the process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["name"] = model.name
        f.attrs["model_version"] = int(model.version)
        f.attrs["metadata"] = json.dumps(model.metadata, sort_keys=True, default=str)
        ref = f.create_group("reference")
        _put(ref, "cell", model.reference.cell, "Angstrom")
        _put(ref, "positions", model.reference.positions, "Angstrom")
        _put(ref, "numbers", model.reference.numbers, "1")
        _put(ref, "masses", model.reference.masses, "amu")
        _put(ref, "energy", model.reference.energy, "eV")
        h = model.harmonic
        har = f.create_group("harmonic")
        har.attrs["conservative"] = bool(h.conservative)
        _put(har, "ifc_cells", h.ifc_cells, "lattice vectors")
        _put(har, "ifc", h.ifc, "eV/Angstrom^2")
        _put(har, "elastic", h.elastic, "eV/Angstrom^3")
        _put(har, "internal_strain", h.internal_strain, "eV/Angstrom")
        if h.has_strain_ifc:
            _put(har, "strain_ifc_cells", h.strain_ifc_cells, "lattice vectors")
            _put(har, "strain_ifc", h.strain_ifc, "eV/Angstrom^2 per unit strain")
        if h.has_dipole:
            _put(har, "born_charges", h.born_charges, "e")
            _put(har, "epsilon_inf", h.epsilon_inf, "1")
        anh = f.create_group("anharmonic")
        tc, tw, doff, disp, soff, strain = _flatten_terms(model.anharmonic.coefficients)
        _put(anh, "values", model.anharmonic.values, "eV/Angstrom^order")
        anh.create_dataset("names", data=np.array([c.name for c in model.anharmonic.coefficients], dtype=object),
                           dtype=h5py.string_dtype())
        _put(anh, "term_coefficient", tc, "1")
        _put(anh, "term_weight", tw, "1")
        _put(anh, "disp_offsets", doff, "1")
        _put(anh, "disp", disp, "1")
        _put(anh, "strain_offsets", soff, "1")
        _put(anh, "strain", strain, "1")
        if model.posterior is not None:
            _write_posterior(f.create_group("posterior"), model.posterior)
    return write_bytes(path, buffer.getbuffer())


def _write_posterior(g, post):
    _put(g, "covariance", post.covariance, "(eV/Angstrom^order)^2")
    _put(g, "feature_scale", post.feature_scale, "1")
    g.attrs["sigma_v"] = post.sigma_v
    g.attrs["sigma_w"] = post.sigma_w
    g.attrs["log_evidence"] = post.log_evidence
    g.attrs["scales"] = json.dumps(post.scales)
    st = g.create_group("stats")
    for k, v in post.stats.items():
        if isinstance(v, np.ndarray):
            _put(st, k, v, "whitened")
        else:
            st.attrs[k] = v


def _read_posterior(g, path):
    from .posterior import Posterior
    try:
        stats = {k: g["stats"][k][()] for k in g["stats"]}
        stats.update({k: (v.item() if hasattr(v, "item") else v) for k, v in g["stats"].attrs.items()})
        return Posterior(g["covariance"][()], float(g.attrs["sigma_v"]), float(g.attrs["sigma_w"]),
                         json.loads(g.attrs["scales"]), g["feature_scale"][()], float(g.attrs["log_evidence"]),
                         stats)
    except KeyError as exc:
        raise ModelFileError(f"{path}: /posterior is incomplete ({exc})") from None


def _get(f, key, path):
    if key not in f:
        raise ModelFileError(f"{path}: missing dataset '/{key}'")
    return f[key][()]


def _unflatten_terms(path, names, values, tc, tw, doff, disp, soff, strain):
    nz, nt = len(values), len(tc)
    if len(names) != nz:
        raise ModelFileError(f"{path}: /anharmonic/names has {len(names)} entries, values has {nz}")
    if len(tw) != nt or len(doff) != nt + 1 or len(soff) != nt + 1:
        raise ModelFileError(f"{path}: /anharmonic term arrays have inconsistent lengths")
    if disp.ndim != 2 or disp.shape[1] != 10 or strain.ndim != 2 or strain.shape[1] != 2:
        raise ModelFileError(f"{path}: /anharmonic/disp must be (nd,10) and /anharmonic/strain (ns,2)")
    if nt and (np.any(np.diff(tc) < 0) or tc.min() < 0 or tc.max() >= nz):
        raise ModelFileError(f"{path}: /anharmonic/term_coefficient must be sorted indices in 0..{nz - 1}")
    if doff[0] != 0 or doff[-1] != len(disp) or np.any(np.diff(doff) < 0):
        raise ModelFileError(f"{path}: /anharmonic/disp_offsets inconsistent with /anharmonic/disp")
    if soff[0] != 0 or soff[-1] != len(strain) or np.any(np.diff(soff) < 0):
        raise ModelFileError(f"{path}: /anharmonic/strain_offsets inconsistent with /anharmonic/strain")
    terms: list[list[Term]] = [[] for _ in range(nz)]
    for t in range(nt):
        try:
            ds = tuple(
                DisplacementDiff(int(r[0]), tuple(r[1:4]), int(r[4]), tuple(r[5:8]), int(r[8]), int(r[9]))
                for r in disp[doff[t]:doff[t + 1]]
            )
            ss = tuple(StrainFactor(int(r[0]), int(r[1])) for r in strain[soff[t]:soff[t + 1]])
            terms[tc[t]].append(Term(float(tw[t]), ds, ss))
        except ValueError as exc:
            raise ModelFileError(f"{path}: anharmonic term {t} (coefficient {tc[t]}): {exc}") from None
    coefs = []
    for z in range(nz):
        if not terms[z]:
            raise ModelFileError(f"{path}: anharmonic coefficient {z} ({names[z]!r}) has no terms")
        coefs.append(Coefficient(tuple(terms[z]), name=names[z]))
    return AnharmonicPart(coefs, values)


def load_model(path) -> Model:
    """Read a native model file; any missing, malformed or incompatible content raises ModelFileError."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ModelFileError(f"{path}: not an HDF5 model file ({exc})") from None
    with f:
        fmt = f.attrs.get("format")
        if fmt != FORMAT:
            raise ModelFileError(f"{path}: not an sp_server model (format attribute is {fmt!r}, expected {FORMAT!r})")
        version = int(f.attrs.get("format_version", -1))
        if version not in READABLE_VERSIONS:
            raise ModelFileError(
                f"{path}: model format version {version} is not supported by this sp_server "
                f"(reads versions {READABLE_VERSIONS}); upgrade sp_server or re-export the model"
            )
        for attr in ("name", "model_version", "metadata"):
            if attr not in f.attrs:
                raise ModelFileError(f"{path}: missing attribute '{attr}'")
        try:
            reference = Reference(
                _get(f, "reference/cell", path), _get(f, "reference/positions", path),
                _get(f, "reference/numbers", path), _get(f, "reference/masses", path),
                float(_get(f, "reference/energy", path)),
            )
            born = f["harmonic/born_charges"][()] if "harmonic/born_charges" in f else None
            eps = f["harmonic/epsilon_inf"][()] if "harmonic/epsilon_inf" in f else None
            harmonic = HarmonicPart(
                _get(f, "harmonic/ifc_cells", path), _get(f, "harmonic/ifc", path),
                _get(f, "harmonic/elastic", path), _get(f, "harmonic/internal_strain", path), born, eps,
                conservative=bool(f["harmonic"].attrs.get("conservative", True)),
                strain_ifc_cells=f["harmonic/strain_ifc_cells"][()] if "harmonic/strain_ifc_cells" in f else None,
                strain_ifc=f["harmonic/strain_ifc"][()] if "harmonic/strain_ifc" in f else None,
            )
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(f, "anharmonic/names", path)]
            anharmonic = _unflatten_terms(
                path, names, np.asarray(_get(f, "anharmonic/values", path), dtype=float),
                *(np.asarray(_get(f, f"anharmonic/{k}", path)) for k in
                  ("term_coefficient", "term_weight", "disp_offsets", "disp", "strain_offsets", "strain")),
            )
            posterior = _read_posterior(f["posterior"], path) if "posterior" in f else None
            return Model(reference, harmonic, anharmonic, name=str(f.attrs["name"]),
                         version=int(f.attrs["model_version"]), metadata=json.loads(f.attrs["metadata"]),
                         posterior=posterior)
        except ModelFileError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelFileError(f"{path}: {exc}") from None
