"""Parity with Debian's multibinit 9.6.2 on the public BaHfO3 model (harmonic, and harmonic + 99 anharmonic terms).

multibinit runs short MDs (fixed cell: dynamics 12; NPT: dynamics 13, optcell 2) on 2x2x2 and 4x4x4 supercells;
we re-evaluate the frames it wrote (_HIST.nc) and compare energies, forces and stresses.  What we found (and what
the assertions pin down):
* energies agree to ~1e-13 relative (of E - N E_ref);
* forces: multibinit applies its force-constant blocks as printed, and those are not exactly symmetric
  (Phi(R) != Phi(-R)^T by up to ~1e-7 relative; on 4x4x4 the folded boundary blocks are further from symmetric).
  With the blocks as printed our forces agree to ~1e-9; the model keeps their symmetric part, so that forces are
  exactly -dE/du, which moves the forces by up to ~1e-5 relative on 4x4x4 (and the energy not at all);
* stress: multibinit divides by the *current* volume and uses the small-strain formula
  sigma = (dE/deta + sym sum_i g_i (x) u_i) / V, which our gradients reproduce to ~1e-7; our stress is the exact
  derivative (finite-difference tested) and differs from multibinit's by O(strain);
* in fixed-cell runs multibinit 9.6.2 writes only dE/deta / V (the displacement part is missing): confirmed.
"""
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from sp_server.io.multibinit import export_multibinit, import_multibinit, read_hist, read_system_xml
from sp_server.kernels.ewald import dipole_dipole_kgrid
from sp_server.kernels.harmonic import HarmonicOperator, fold_ifc_kgrid
from sp_server.model.mapping import stress_voigt, symmetric_from_voigt
from sp_server.potential import Evaluator
from sp_server.units import BOHR_A, HARTREE_EV

REF = Path(__file__).resolve().parents[3] / "shared" / "reference" / "multibinit" / "BaHfO3"
MULTIBINIT = shutil.which("multibinit")

pytestmark = pytest.mark.skipif(
    not REF.exists(), reason=f"reference data {REF} not present (it lives in the project's shared/ folder)")


def run_multibinit(workdir: Path, name: str, system: Path, coeffs: Path | None, **variables) -> list:
    if MULTIBINIT is None:
        pytest.fail("multibinit not found: `make test` installs it (apt-get install abinit)")
    inp = workdir / f"{name}.in"
    inp.write_text("".join(f"{k} = {v}\n" for k, v in variables.items()))
    files = f"{inp.name}\n{name}.abo\n{system}\n{coeffs or ''}\n"
    proc = subprocess.run([MULTIBINIT], input=files, text=True, capture_output=True, cwd=workdir, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return read_hist(workdir / f"{name}.abo_HIST.nc")


MD = dict(dipdip=1, ngqpt="4 4 4", temperature=300, dtion=40)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("multibinit")
    for f in REF.iterdir():
        shutil.copy(f, work / f.name)
    ddb, coeffs = work / "BaHfO3_DDB", work / "BaHfO3.xml"
    out = {"work": work}
    run_multibinit(work, "model", ddb, coeffs, ncell="2 2 2", dynamics=12, ntime=1, prt_model=2, **MD)
    out["system"] = work / "model_sys.xml"
    out["harm_nvt_2"] = run_multibinit(work, "harm_nvt_2", ddb, None, ncell="2 2 2", dynamics=12, ntime=12, **MD)
    out["harm_npt_4"] = run_multibinit(work, "harm_npt_4", ddb, None, ncell="4 4 4", dynamics=13, optcell=2,
                                       ntime=12, **MD)
    out["anh_nvt_2"] = run_multibinit(work, "anh_nvt_2", ddb, coeffs, ncell="2 2 2", dynamics=12, ntime=12, **MD)
    out["anh_nvt_4"] = run_multibinit(work, "anh_nvt_4", ddb, coeffs, ncell="4 4 4", dynamics=12, ntime=12, **MD)
    out["anh_npt_2"] = run_multibinit(work, "anh_npt_2", ddb, coeffs, ncell="2 2 2", dynamics=13, optcell=2,
                                      ntime=30, **MD)
    out["anh_npt_4"] = run_multibinit(work, "anh_npt_4", ddb, coeffs, ncell="4 4 4", dynamics=13, optcell=2,
                                      ntime=16, **MD)
    out["anh_npt_3x3x4"] = run_multibinit(work, "anh_npt_334", ddb, coeffs, ncell="3 3 4", dynamics=13, optcell=2,
                                          ntime=12, **MD)
    return out


@pytest.fixture(scope="module")
def models(runs):
    return {"harm": import_multibinit(system=runs["system"]),
            "anh": import_multibinit(system=runs["system"], coefficients=runs["work"] / "BaHfO3.xml"),
            "ddb": import_multibinit(ddb=runs["work"] / "BaHfO3_DDB", coefficients=runs["work"] / "BaHfO3.xml")}


def raw_operator(system: Path, model, mesh):
    """The harmonic operator with multibinit's force-constant blocks exactly as printed (not symmetrised)."""
    root = ET.parse(system).getroot()
    nat = model.natoms
    cells, blocks = [], []
    for blk in root.findall("local_force_constant"):
        cells.append([int(x) for x in blk.find("cell").text.split()])
        blocks.append(np.array(blk.find("data").text.split(), float).reshape(nat, 3, nat, 3))
    ck = fold_ifc_kgrid(np.array(cells), np.array(blocks) * HARTREE_EV / BOHR_A ** 2, mesh)
    h = model.harmonic
    ck += dipole_dipole_kgrid(model.reference.cell, model.reference.positions, h.born_charges, h.epsilon_inf, mesh)
    return HarmonicOperator(ck, mesh)


def compare(runs, models, run, kind, npt):
    model = models[kind]
    ev = Evaluator(model)
    frames = runs[run][1:]
    worst = {"energy": 0.0, "forces_raw": 0.0, "forces": 0.0, "stress_mb_formula": 0.0, "stress_exact": 0.0}
    for atoms in frames[::3]:
        ncell = len(atoms) // model.natoms
        e_mb, f_mb, s_mb = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        res = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers)
        scale_e = abs(e_mb - ncell * model.reference.energy)
        worst["energy"] = max(worst["energy"], abs(res.energy - e_mb) / scale_e)
        fscale = np.abs(f_mb).max()
        worst["forces"] = max(worst["forces"], np.abs(res.forces - f_mb).max() / fscale)
        # the same frame with multibinit's printed (non-symmetric) blocks
        pot = ev.potential(res.frame.mesh)
        sym_op = pot.harmonic_operator
        pot.harmonic_operator = raw_operator(runs["system"], model, res.frame.mesh)
        fr = res.frame
        try:
            raw = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers)
            evm = pot.evaluate(fr.u, fr.eta)  # gradients with the printed blocks, for multibinit's stress formula
        finally:
            pot.harmonic_operator = sym_op
        worst["forces_raw"] = max(worst["forces_raw"], np.abs(raw.forces - f_mb).max() / fscale)
        # multibinit's stress formula from our gradients: (dE/deta + sym sum g (x) u) / V_current
        G = symmetric_from_voigt(evm.grad_eta)
        vir = evm.grad_u.reshape(-1, 3).T @ fr.u.reshape(-1, 3)
        full = fr.rotation @ (G + 0.5 * (vir + vir.T)) @ fr.rotation.T / fr.volume
        partial = fr.rotation @ G @ fr.rotation.T / fr.volume
        sscale = max(np.abs(s_mb).max(), 1e-9)  # eV/A^3; fixed-cell harmonic runs print ~1e-17 (zero)
        target = full if npt else partial
        worst["stress_mb_formula"] = max(worst["stress_mb_formula"], np.abs(stress_voigt(target) - s_mb).max() / sscale)
        if npt:
            worst["stress_exact"] = max(worst["stress_exact"],
                                        np.abs(res.stress - s_mb).max() / sscale / max(np.abs(fr.eta).max(), 1e-6))
    return worst


CASES = [("harm_nvt_2", "harm", False), ("harm_npt_4", "harm", True), ("anh_nvt_2", "anh", False),
         ("anh_nvt_4", "anh", False), ("anh_npt_2", "anh", True), ("anh_npt_4", "anh", True),
         ("anh_npt_3x3x4", "anh", True)]


@pytest.mark.parametrize("run,kind,npt", CASES)
def test_parity_with_multibinit(runs, models, run, kind, npt):
    w = compare(runs, models, run, kind, npt)
    print(run, {k: f"{v:.1e}" for k, v in w.items()})
    assert w["energy"] < 1e-6
    assert w["forces_raw"] < 1e-6  # multibinit's own (printed) force constants: parity
    assert w["forces"] < 5e-5  # symmetrised model: the asymmetry of the printed blocks, nothing else
    assert w["stress_mb_formula"] < 1e-6
    if npt:
        assert w["stress_exact"] < 10.0  # exact stress differs from multibinit's by O(strain) only


def worst_energy_forces(model, frames) -> tuple:
    """Largest relative differences over multibinit's frames: energy (of E - N E_ref) and forces (of the largest
    component)."""
    ev = Evaluator(model)
    worst_e = worst_f = 0.0
    for atoms in frames:
        ncell = len(atoms) // model.natoms
        res = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers)
        e_mb = atoms.get_potential_energy()
        worst_e = max(worst_e, abs(res.energy - e_mb) / abs(e_mb - ncell * model.reference.energy))
        worst_f = max(worst_f, np.abs(res.forces - atoms.get_forces()).max() / np.abs(atoms.get_forces()).max())
    return worst_e, worst_f


@pytest.mark.parametrize("run,npt", [("anh_nvt_2", False), ("anh_npt_4", True), ("anh_npt_3x3x4", True)])
def test_parity_of_the_model_built_from_the_ddb(runs, models, run, npt):
    """Our own Fourier interpolation of the DDB (no multibinit-written file involved) against multibinit."""
    worst_e, worst_f = worst_energy_forces(models["ddb"], runs[run][1::3])
    print(run, f"energy {worst_e:.1e} forces {worst_f:.1e}")
    assert worst_e < 1e-6 and worst_f < 5e-5  # forces: multibinit applies its unsymmetrised blocks


@pytest.fixture(scope="module")
def exact_models(runs, tmp_path_factory):
    """`sp-server import --multibinit-exact` from the DDB (harmonic, and with the coefficients), saved and loaded
    back, so the file format is part of what is tested."""
    from sp_server.cli.main import main as cli
    from sp_server.model.native import load_model
    out = {}
    tmp = tmp_path_factory.mktemp("exact")
    for kind, extra in (("harm", []), ("anh", ["--coefficients", str(runs["work"] / "BaHfO3.xml")])):
        path = tmp / f"{kind}.h5"
        assert cli(["import", "--ddb", str(runs["work"] / "BaHfO3_DDB"), *extra, "--multibinit-exact",
                    "-o", str(path)]) == 0
        out[kind] = load_model(path)
    return out


@pytest.mark.parametrize("run,kind,npt", CASES)
def test_multibinit_exact_import_gives_multibinit_forces(runs, exact_models, run, kind, npt):
    """issue 18 item 3: with --multibinit-exact the forces agree with multibinit's to 1e-6 relative (measured ~1e-9,
    the HIST file's digits); the symmetrised model stays at ~1e-5 (test above)."""
    model = exact_models[kind]
    assert not model.harmonic.conservative
    worst_e, worst_f = worst_energy_forces(model, runs[run][1::2])
    print(run, f"energy {worst_e:.1e} forces {worst_f:.1e}")
    assert worst_e < 1e-8 and worst_f < 1e-6


def test_multibinit_exact_system_xml_keeps_the_printed_blocks(runs):
    """From a system XML the blocks are kept as printed (no symmetrisation, no sum rule of ours), except the on-site
    block, which takes multibinit's own sum-rule shift (zero to rounding for this file: tests/io/
    test_multibinit_srtio3.py has one where it is not)."""
    ref, h, info = read_system_xml(runs["system"], exact=True)
    assert info["ifc_onsite_sum_rule_shift_eV_A2"] < 1e-9
    _, hs, _ = read_system_xml(runs["system"])
    assert not h.conservative and hs.conservative
    assert 0 < h.asymmetry() < 1e-5 and hs.asymmetry() < 1e-12
    root = ET.parse(runs["system"]).getroot()
    printed = {tuple(int(x) for x in b.find("cell").text.split()): np.array(b.find("data").text.split(), float)
               for b in root.findall("local_force_constant")}
    for c, blk in zip(h.ifc_cells, h.ifc):
        if tuple(c) in printed:
            shift = info["ifc_onsite_sum_rule_shift_eV_A2"] if tuple(c) == (0, 0, 0) else 0.0
            np.testing.assert_allclose(blk.reshape(-1) / (HARTREE_EV / BOHR_A ** 2), printed[tuple(c)], rtol=0,
                                       atol=1e-14 * np.abs(printed[(0, 0, 0)]).max()
                                       + shift / (HARTREE_EV / BOHR_A ** 2))


def test_export_is_read_back_by_multibinit(runs, models, tmp_path):
    """Our model written as MULTIBINIT XML and run by multibinit gives the energies we compute."""
    sys_xml, coeffs = export_multibinit(models["anh"], tmp_path / "exported")
    frames = run_multibinit(tmp_path, "exported", sys_xml, coeffs, ncell="2 2 2", dipdip=1, dynamics=13, optcell=2,
                            temperature=300, dtion=40, ntime=20)
    ev = Evaluator(models["anh"])
    for atoms in frames[1::4]:
        res = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers)
        scale = abs(atoms.get_potential_energy() - 8 * models["anh"].reference.energy)
        assert abs(res.energy - atoms.get_potential_energy()) < 1e-6 * scale
        assert np.abs(res.forces - atoms.get_forces()).max() < 1e-6 * np.abs(atoms.get_forces()).max()


def test_20_atom_orthorhombic_reference_with_anisotropic_dielectric(runs, models, tmp_path):
    """A 20-atom orthorhombic reference (a = [110], b = [-110], c = 2 [001] of the cubic cell), Born charges and a
    non-cubic eps_inf, on a non-cubic 2x1x2 supercell: exported, run by multibinit (NPT), re-evaluated here."""
    from sp_server.model import Model
    from sp_server.model.supercell import expand_reference
    base = models["anh"]
    h = base.harmonic
    h2 = type(h)(h.ifc_cells, h.ifc, h.elastic, h.internal_strain, h.born_charges, np.diag([4.4, 4.7, 5.3]))
    model = expand_reference(Model(base.reference, h2, base.anharmonic, name="BaHfO3-aniso"),
                             [[1, 1, 0], [-1, 1, 0], [0, 0, 2]])
    assert model.natoms == 20
    sys_xml, coeffs = export_multibinit(model, tmp_path / "ortho")
    frames = run_multibinit(tmp_path, "ortho", sys_xml, coeffs, ncell="2 1 2", dipdip=1, dynamics=13, optcell=2,
                            temperature=200, dtion=40, ntime=12)
    assert len(frames[0]) == 80
    ev = Evaluator(model)
    for atoms in frames[2::3]:
        res = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers)
        scale = abs(atoms.get_potential_energy() - 4 * model.reference.energy)
        assert abs(res.energy - atoms.get_potential_energy()) < 1e-6 * scale
        assert np.abs(res.forces - atoms.get_forces()).max() < 1e-6 * np.abs(atoms.get_forces()).max()
