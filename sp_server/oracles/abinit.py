"""ABINIT as an oracle: an ASE calculator that labels one structure per call with ABINIT 9 (energy, forces, stress).
Owns the ABINIT input, the MPI launch (fresh run directory, cleaned environment) and the checked reading of results.

Conventions (checked by tests/oracles/test_abinit.py): everything is written in bohr with ``ase.units.Bohr`` and
read back from the ``*_GSR.nc`` file (HDF5, read with h5py: full double precision) with ``ase.units``.  ABINIT's
``cartesian_stress_tensor`` is (1/V) dE/deps in Voigt order xx yy zz yz xz xy, i.e. already ASE's sign and order
(positive = the cell wants to shrink).  A left-handed cell (which ABINIT refuses) is passed as -cell, the same
lattice.  SCF convergence is read from the main output ``abinit.abo``; ABINIT itself exits 0 when not converged.
"""
from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.units import Bohr, Hartree

from ..fit.harmonic import OracleError

__all__ = ["make_abinit", "AbinitOracle", "kpoint_grid", "child_environment", "DEFAULT_PSEUDO_DIR"]

DEFAULT_PSEUDO_DIR = "/usr/share/abinit/psp/Pseudodojo_nc_sr_04_pw_standard_psp8"
DEFAULT_KSPACING = 0.3
# Variables of an enclosing MPICH / Hydra / Intel MPI launch (mpi4py from PyPI): inherited by Open MPI's mpirun they
# make it (or a singleton abinit) try to join the caller's job.
MPI_LAUNCHER_PREFIXES = ("PMI_", "MPIR_", "HYDRA_", "HYDI_", "MPICH_", "I_MPI_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID")
# Functionals by the pspxc codes of pseudopotential headers (ABINIT ixc numbers, negative = LibXC).
XC_CODES = {"LDA": {1, 2, 3, 7, -1007, -1009, -1012}, "PBE": {11, -101130}, "PBEsol": {-116133}}
# Keywords owned by the named options or by the structure (or that would change the geometry or the run).
RESERVED = {"acell", "rprim", "rprimd", "angdeg", "scalecart", "xred", "xcart", "xangst", "natom", "ntypat", "typat",
            "znucl", "pseudos", "pp_dirpath", "ecut", "ecutsm", "ngkpt", "kptrlatt", "nshiftk", "shiftk", "tolvrs",
            "nstep", "ixc", "optforces", "optstress", "ndtset", "jdtset", "ionmov", "optcell", "ntime"}
SCF_NOT_CONVERGED = "was not enough SCF cycles to converge"
SCF_CONVERGED = "=>converged."


@dataclass(frozen=True)
class AbinitSettings:
    """Validated options of :func:`make_abinit` (units there)."""

    pseudo_dir: Path
    pseudos: dict
    xc: str
    ixc: Optional[int]
    ecut_ha: float
    ecutsm_ha: float
    kspacing: Optional[float]
    ngkpt: Optional[tuple]
    shiftk: tuple
    tolvrs: float
    nstep: int
    ranks: int
    mpirun: tuple
    abinit: str
    workdir: Path
    keep_failed: bool
    timeout_s: Optional[float]
    extra: dict


def make_abinit(*, pseudo_dir: str = DEFAULT_PSEUDO_DIR, pseudos: Optional[dict] = None, xc: str = "LDA",
                ixc: Optional[int] = None, ecut_ha: float = 30.0, ecutsm_ha: float = 0.5,
                kspacing: Optional[float] = None, ngkpt=None, shiftk=(0.0, 0.0, 0.0), tolvrs: float = 1e-10,
                nstep: int = 50, ranks: int = 1, mpirun: str = "/usr/bin/mpirun", abinit: str = "abinit",
                workdir: Optional[str] = None, keep_failed: bool = True, timeout_s: Optional[float] = None,
                extra: Optional[dict] = None) -> "AbinitOracle":
    """An ASE calculator (energy eV, forces eV/A, stress eV/A^3 in ASE's convention) running ABINIT on each structure.

    pseudo_dir: directory of the pseudopotentials (default: Debian's PseudoDojo NC-SR v0.4 standard psp8, LDA
        Perdew-Wang; it has Ba.psp8, Ti.psp8, O.psp8 among others).
    pseudos: optional mapping element -> file name (relative to ``pseudo_dir``, or absolute); elements not in it use
        ``<Element>.psp8`` in ``pseudo_dir``.
    xc: the functional the pseudopotentials are meant for ("LDA", "PBE", "PBEsol" are checked against the pspxc code
        in each pseudopotential header; other names are labels).  ABINIT takes the functional from the
        pseudopotentials; PBEsol needs user-supplied PBEsol pseudopotentials (e.g. PseudoDojo's pbesol set).
    ixc: ABINIT's ixc, written only when given (overrides the pseudopotentials' functional; skips the xc check).
    ecut_ha: plane-wave cutoff, Hartree.
    ecutsm_ha: kinetic-energy smearing at the cutoff, Hartree (ABINIT's ecutsm): makes the energy a smooth function
        of the cell, so that the stress is its derivative (0 switches it off).
    kspacing: k-point density, 1/A: ngkpt_i = max(1, ceil(|b_i| / kspacing)), b_i the reciprocal vectors including
        2 pi (default 0.3 1/A: 6x6x6 for a 4 A cubic cell, 3x3x3 for its 2x2x2 supercell).
    ngkpt: explicit k-point grid (three integers) instead of kspacing.
    shiftk: k-grid shift(s) in reduced units, one triple or a list of triples; default (0, 0, 0), a Gamma-centred
        grid, which folds consistently between a cell and its supercells.
    tolvrs: SCF convergence on the potential residual (ABINIT's tolvrs, dimensionless).
    nstep: maximum number of SCF steps; not converging within them is an error.
    ranks: MPI ranks per ABINIT call (``mpirun --bind-to none -np ranks abinit``; 1 runs abinit directly).
    mpirun: the MPI launcher, a command line (default Open MPI's /usr/bin/mpirun, which Debian's abinit links).
    abinit: the ABINIT executable (name on PATH or path).
    workdir: directory under which each call makes a fresh run directory abinit_XXXX (default: the system temporary
        directory); a successful run's directory is removed.
    keep_failed: keep the run directory of a failed call (its name is in the error message).
    timeout_s: seconds after which a call is killed and counts as failed (default: no limit).
    extra: raw ABINIT keywords {name: value} (numbers, strings written as given, lists); not the ones set above or by
        the structure.

    Failures (non-zero exit, missing results, SCF not converged, NaN) raise OracleError naming the run directory and
    the reason; bad options raise ValueError.
    """
    pseudo_path = Path(pseudo_dir)
    if not pseudo_path.is_dir():
        raise ValueError(f"pseudo_dir {pseudo_dir} is not a directory")
    pseudos = {str(k): str(v) for k, v in (pseudos or {}).items()}
    for element, name in pseudos.items():
        if not (pseudo_path / name).is_file():
            raise ValueError(f"pseudopotential for {element}: {pseudo_path / name} does not exist")
    if ngkpt is not None and kspacing is not None:
        raise ValueError("give either kspacing or ngkpt, not both")
    if ngkpt is not None:
        ngkpt = tuple(int(n) for n in ngkpt)
        if len(ngkpt) != 3 or min(ngkpt) < 1:
            raise ValueError(f"ngkpt must be three positive integers, got {ngkpt}")
    elif kspacing is None:
        kspacing = DEFAULT_KSPACING
    if kspacing is not None and not kspacing > 0:
        raise ValueError(f"kspacing must be > 0 (1/A), got {kspacing}")
    shifts = np.atleast_2d(np.asarray(shiftk, dtype=float))
    if shifts.ndim != 2 or shifts.shape[1] != 3:
        raise ValueError(f"shiftk must be a triple or a list of triples, got {shiftk}")
    if not (ecut_ha > 0 and ecutsm_ha >= 0 and tolvrs > 0 and int(nstep) >= 1 and int(ranks) >= 1):
        raise ValueError(f"need ecut_ha > 0, ecutsm_ha >= 0, tolvrs > 0, nstep >= 1, ranks >= 1 (got {ecut_ha}, "
                         f"{ecutsm_ha}, {tolvrs}, {nstep}, {ranks})")
    extra = dict(extra or {})
    clash = sorted(RESERVED & {k.lower() for k in extra})
    if clash:
        raise ValueError(f"extra ABINIT keywords {clash} are set by the oracle's options or the structure")
    if shutil.which(abinit) is None:
        raise ValueError(f"ABINIT executable {abinit!r} not found (Debian/Ubuntu: apt-get install abinit)")
    launcher = tuple(shlex.split(mpirun))
    if int(ranks) > 1 and (not launcher or shutil.which(launcher[0]) is None):
        raise ValueError(f"MPI launcher {mpirun!r} not found (needed for ranks = {ranks})")
    root = Path(workdir) if workdir is not None else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    settings = AbinitSettings(pseudo_path, pseudos, str(xc), None if ixc is None else int(ixc), float(ecut_ha),
                              float(ecutsm_ha), None if kspacing is None else float(kspacing), ngkpt,
                              tuple(map(tuple, shifts)), float(tolvrs), int(nstep), int(ranks), launcher, abinit,
                              root, bool(keep_failed), None if timeout_s is None else float(timeout_s), extra)
    return AbinitOracle(settings)


class AbinitOracle(Calculator):
    """ASE calculator: one ABINIT ground-state run (energy, forces, stress) per structure; see :func:`make_abinit`."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]
    name = "abinit"

    def __init__(self, settings: AbinitSettings):
        super().__init__()
        self.settings = settings

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if not atoms.pbc.all() or abs(atoms.cell.volume) < 1e-6:
            raise OracleError("ABINIT oracle: the structure needs a 3D periodic cell (pbc all True, non-zero volume)")
        files = self._pseudo_files(atoms)
        run_dir = Path(tempfile.mkdtemp(prefix="abinit_", dir=self.settings.workdir))
        try:
            (run_dir / "abinit.abi").write_text(self._input(atoms, files))
            self._run(run_dir)
            self.results = self._read(run_dir, len(atoms))
        except OracleError as exc:
            if not self.settings.keep_failed:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise OracleError(f"{exc} (run directory removed: keep_failed = false)") from None
            raise
        shutil.rmtree(run_dir, ignore_errors=True)

    # -- input ----------------------------------------------------------------------------------------------------
    def _pseudo_files(self, atoms) -> dict:
        """element -> pseudopotential path, in order of first appearance; checks existence and the functional."""
        s = self.settings
        files = {}
        for element in dict.fromkeys(atoms.get_chemical_symbols()):
            path = s.pseudo_dir / s.pseudos.get(element, f"{element}.psp8")
            if not path.is_file():
                raise OracleError(f"ABINIT oracle: no pseudopotential for {element} in {s.pseudo_dir} (looked for "
                                  f"{path.name}; set pseudos = {{{element} = \"FILE\"}} or pseudo_dir)")
            pspxc = _pspxc(path)
            if s.ixc is None and s.xc in XC_CODES and pspxc is not None and pspxc not in XC_CODES[s.xc]:
                raise OracleError(f"ABINIT oracle: xc = {s.xc!r} but {path} was made for pspxc = {pspxc}; ABINIT takes "
                                  f"the functional from the pseudopotentials: give {s.xc} pseudopotentials "
                                  f"(pseudo_dir / pseudos)")
            files[element] = path.resolve()
        return files

    def _input(self, atoms, files: dict) -> str:
        s = self.settings
        cell = atoms.cell.array
        if np.linalg.det(cell) < 0:        # ABINIT needs (a1 x a2) . a3 > 0; -cell is the same lattice
            cell = -cell
        types = list(files)
        typat = [types.index(e) + 1 for e in atoms.get_chemical_symbols()]
        znucl = [atoms.numbers[atoms.get_chemical_symbols().index(e)] for e in types]
        lines = ["# written by sp_server.oracles.abinit; lengths in bohr (ase.units.Bohr)",
                 "acell 3*1.0",
                 "rprim", *(_row(v) for v in cell / Bohr),
                 f"natom {len(atoms)}", f"ntypat {len(types)}",
                 "znucl " + " ".join(str(z) for z in znucl),
                 "typat " + " ".join(str(t) for t in typat),
                 "xcart", *(_row(v) for v in atoms.positions / Bohr),
                 'pseudos "' + ", ".join(str(files[e]) for e in types) + '"',
                 f"ecut {s.ecut_ha!r}", f"ecutsm {s.ecutsm_ha!r}",
                 "kptopt 1", "ngkpt " + " ".join(str(n) for n in s.ngkpt or kpoint_grid(cell, s.kspacing)),
                 f"nshiftk {len(s.shiftk)}", "shiftk", *(_row(v) for v in s.shiftk),
                 f"tolvrs {s.tolvrs!r}", f"nstep {s.nstep}",
                 "optforces 1", "optstress 1",
                 "chkprim 0", "chksymbreak 0",
                 "prtwf 0", "prtden 0", "prteig 0", "prtebands 0"]
        if s.ixc is not None:
            lines.append(f"ixc {s.ixc}")
        lines += [f"{key} {_value(value)}" for key, value in s.extra.items()]
        return "\n".join(lines) + "\n"

    # -- run ------------------------------------------------------------------------------------------------------
    def _command(self) -> list:
        s = self.settings
        if s.ranks == 1:
            return [s.abinit, "abinit.abi"]
        return [*s.mpirun, "--bind-to", "none", "-np", str(s.ranks), s.abinit, "abinit.abi"]

    def _run(self, run_dir: Path) -> None:
        s = self.settings
        with open(run_dir / "abinit.log", "w") as out, open(run_dir / "abinit.err", "w") as err:
            proc = subprocess.Popen(self._command(), cwd=run_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=child_environment(), start_new_session=True)
            try:
                rc = proc.wait(timeout=s.timeout_s)
            except subprocess.TimeoutExpired:
                _kill(proc)
                raise _failure(run_dir, f"timed out after {s.timeout_s:g} s") from None
            except BaseException:
                _kill(proc)
                raise
        if rc != 0:
            raise _failure(run_dir, f"exit code {rc}: {_abinit_message(run_dir)}")

    # -- results --------------------------------------------------------------------------------------------------
    def _read(self, run_dir: Path, natom: int) -> dict:
        main = run_dir / "abinit.abo"
        gsr = run_dir / "abinito_GSR.nc"
        for path in (main, gsr):
            if not path.is_file():
                raise _failure(run_dir, f"missing output {path.name}: {_abinit_message(run_dir)}")
        text = main.read_text(errors="replace")
        for line in text.splitlines():
            if SCF_NOT_CONVERGED in line:
                raise _failure(run_dir, f"SCF not converged within nstep = {self.settings.nstep} "
                                        f"(ABINIT: {' '.join(line.split())})")
        if SCF_CONVERGED not in text:
            raise _failure(run_dir, f"no SCF convergence message ({SCF_CONVERGED!r}) in abinit.abo")
        import h5py
        try:
            with h5py.File(gsr, "r") as f:
                energy = float(f["etotal"][()]) * Hartree
                forces = np.array(f["cartesian_forces"][()], dtype=float).reshape(-1, 3) * (Hartree / Bohr)
                stress = np.array(f["cartesian_stress_tensor"][()], dtype=float).reshape(-1) * (Hartree / Bohr ** 3)
        except (OSError, KeyError) as exc:
            raise _failure(run_dir, f"cannot read {gsr.name}: {exc}") from None
        if forces.shape != (natom, 3) or stress.shape != (6,):
            raise _failure(run_dir, f"{gsr.name} has forces {forces.shape} and stress {stress.shape}, expected "
                                    f"({natom}, 3) and (6,)")
        for name, value in (("energy", energy), ("forces", forces), ("stress", stress)):
            if not np.all(np.isfinite(value)):
                raise _failure(run_dir, f"non-finite {name} (NaN or inf)")
        return {"energy": energy, "free_energy": energy, "forces": forces, "stress": stress}


def kpoint_grid(cell, kspacing: float) -> tuple:
    """ngkpt_i = max(1, ceil(|b_i| / kspacing)), b_i the reciprocal vectors (with 2 pi) of ``cell`` (rows, A);
    kspacing in 1/A."""
    b = 2 * np.pi * np.linalg.norm(np.linalg.inv(np.asarray(cell, dtype=float)).T, axis=1)
    return tuple(max(1, math.ceil(float(x) / kspacing - 1e-9)) for x in b)


def child_environment() -> dict:
    """The environment of an ABINIT run: the caller's, without an enclosing MPICH/Hydra launch's variables, with
    Open MPI allowed to run as root and one thread per rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(MPI_LAUNCHER_PREFIXES)}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    return env


def _failure(run_dir: Path, reason: str) -> OracleError:
    return OracleError(f"ABINIT run in {run_dir} failed: {reason}")


def _kill(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a run: SIGTERM to its process group (Open MPI's mpirun then kills its ranks, which sit in process
    groups of their own), SIGKILL after ``grace_s`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _abinit_message(run_dir: Path) -> str:
    """The first ERROR/BUG message ABINIT wrote (the file the aborting MPI rank writes, whichever rank it is; then
    standard output and the main output, which rank 0 may not have flushed before MPI_ABORT), else the end of
    stderr."""
    for name in ("__ABI_MPIABORTFILE__", "abinit.log", "abinit.abo"):
        path = run_dir / name
        if not path.is_file():
            continue
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.strip() in ("--- !ERROR", "--- !BUG"):
                body = []
                for follow in lines[i + 1:]:
                    if follow.strip() == "...":
                        break
                    body.append(follow.strip())
                text = " ".join(body)
                return text.split("message: |", 1)[-1].strip() or text
    err = run_dir / "abinit.err"
    tail = " ".join(err.read_text(errors="replace").split()[-60:]) if err.is_file() else ""
    return f"no ABINIT error message; stderr: {tail}" if tail else "no ABINIT error message, empty stderr"


def _pspxc(path: Path) -> Optional[int]:
    """The pspxc code on line 3 of an ABINIT-format pseudopotential (pspcod pspxc ...), None for other formats."""
    try:
        with open(path, errors="replace") as fh:
            lines = [fh.readline() for _ in range(3)]
        return int(lines[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _row(v) -> str:
    return " ".join(f"{float(x):.16e}" for x in v)


def _value(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (list, tuple, np.ndarray)):
        return " ".join(_value(v) for v in value)
    return str(value)
