"""Harmonic part of a model from an oracle (sp_server.fit.harmonic).

What is pinned down here:
* teacher tests: with a second-principles model as the oracle, harmonic_from_oracle gives back its IFCs (forces
  of random displacement patterns on the phonopy supercell and on other supercells), its elastic tensor and its
  internal strain (toy perovskite, cubic, and a random triclinic model with a non-zero Lambda), to ~1e-12;
  with dipoles and the teacher's Born charges (from a phonopy BORN file or from the calculator) the short-range /
  dipole-dipole split reproduces the teacher on 2x2x2, 3x3x3 and 4x4x4 supercells;
* a real oracle (ASE's EMT): zero-pressure lattice constant; end to end on cubic Cu3Au, the model agrees with
  EMT's forces (odd part, to the finite-difference accuracy), with an independent Gamma-point Hessian and with the
  elastic constants from energy-strain curves (which checks the engineering shear convention);
* failures: an oracle that raises or returns NaN gives an OracleError (RuntimeError) naming the step and the
  configuration; a non-stationary reference is refused; BORN files are read (and expanded by symmetry).
"""
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from sp_server import SecondPrinciplesCalculator
from sp_server.fit.harmonic import (
    NO_BORN_MESSAGE,
    HarmonicSettings,
    NotStationaryError,
    OracleError,
    harmonic_from_oracle,
    read_phonopy_born,
    relax_cubic_lattice,
)
from sp_server.io.ddb import harmonic_dynamical_matrices
from sp_server.model.mapping import matrix_from_voigt
from sp_server.model.toy import toy_perovskite
from tests.conftest import random_model

TIGHT = 1e-8   # teacher tests (reached: ~1e-13)


def force_mismatch(teacher, student, mesh, seed=0, amp=0.03):
    """max |F_teacher - F_student| / max |F_teacher| for a random displacement pattern on a mesh supercell."""
    rng = np.random.default_rng(seed)
    atoms = teacher.supercell(mesh)
    atoms.positions += rng.normal(0, amp, atoms.positions.shape)
    forces = []
    for model in (teacher, student):
        a = atoms.copy()
        a.calc = SecondPrinciplesCalculator(model)
        forces.append(a.get_forces())
    return np.abs(forces[0] - forces[1]).max() / np.abs(forces[0]).max()


def rel(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(b).max(), 1e-300)


class Lines(list):
    def __call__(self, *args):
        self.append(" ".join(str(a) for a in args))


# ----------------------------------------------------------------------------------------------------------------
# teacher tests
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("supercell, plusminus", [((2, 2, 2), True), ((3, 2, 2), "auto")])
def test_teacher_toy_perovskite(supercell, plusminus):
    teacher = toy_perovskite(dipole=False, anharmonic=False)
    log = Lines()
    student = harmonic_from_oracle(teacher.reference.to_atoms(), SecondPrinciplesCalculator(teacher),
                                   HarmonicSettings(supercell=supercell, plusminus=plusminus), log=log)
    assert any(NO_BORN_MESSAGE in line for line in log)
    assert not student.harmonic.has_dipole
    assert student.metadata["lattice_constant"] == pytest.approx(4.0, abs=1e-12)   # relaxed: already at p = 0
    np.testing.assert_allclose(student.reference.cell, teacher.reference.cell, atol=1e-12)
    # the phonopy supercell and others: the toy's springs are short enough for the WS interpolation to be exact
    for mesh in (supercell, (3, 3, 3), (4, 3, 2)):
        assert force_mismatch(teacher, student, mesh) < TIGHT, mesh
    assert rel(student.harmonic.elastic, teacher.harmonic.elastic) < TIGHT
    assert np.abs(student.harmonic.internal_strain).max() < 1e-10          # zero by symmetry
    assert student.harmonic.asr_violation() < 1e-10
    assert student.reference.energy == pytest.approx(teacher.reference.energy, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
def test_teacher_random_triclinic_internal_strain(seed):
    teacher = random_model(seed, dipole=False, nterms=0)
    assert np.abs(teacher.harmonic.internal_strain).max() > 0.1
    student = harmonic_from_oracle(teacher.reference.to_atoms(), SecondPrinciplesCalculator(teacher),
                                   HarmonicSettings(supercell=(2, 2, 2), relax_lattice=False), log=None)
    assert student.metadata["lattice_constant"] is None
    assert force_mismatch(teacher, student, (2, 2, 2)) < TIGHT
    assert rel(student.harmonic.elastic, teacher.harmonic.elastic) < TIGHT
    assert rel(student.harmonic.internal_strain, teacher.harmonic.internal_strain) < TIGHT
    assert student.reference.energy == pytest.approx(teacher.reference.energy, abs=1e-10)
    # strained and displaced at once: elastic + strain-phonon + harmonic parts together
    rng = np.random.default_rng(5)
    atoms = teacher.supercell((2, 2, 2))
    atoms.positions += rng.normal(0, 0.03, atoms.positions.shape)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + matrix_from_voigt(rng.normal(0, 0.01, 6))).T, scale_atoms=True)
    res = []
    for model in (teacher, student):
        a = atoms.copy()
        a.calc = SecondPrinciplesCalculator(model)
        res.append((a.get_potential_energy(), a.get_forces(), a.get_stress()))
    assert res[1][0] == pytest.approx(res[0][0], abs=1e-9)
    assert rel(res[1][1], res[0][1]) < TIGHT
    assert rel(res[1][2], res[0][2]) < TIGHT


def write_born(path, born, eps, atoms_indices):
    lines = ["default"] + [" ".join(f"{x:.10f}" for x in eps.ravel())]
    lines += [" ".join(f"{x:.10f}" for x in born[i].ravel()) for i in atoms_indices]
    path.write_text("\n".join(lines) + "\n")


def test_teacher_with_dipoles_from_born_file(tmp_path):
    teacher = toy_perovskite(dipole=True, anharmonic=False)
    h = teacher.harmonic
    born_file = tmp_path / "BORN"
    write_born(born_file, h.born_charges, h.epsilon_inf, [0, 1, 2])       # Ba, Ti and the first O only
    calc = SecondPrinciplesCalculator(teacher)
    student = harmonic_from_oracle(teacher.reference.to_atoms(), calc, HarmonicSettings(supercell=(2, 2, 2)),
                                   born=born_file, log=None)
    assert student.harmonic.has_dipole
    np.testing.assert_allclose(student.harmonic.born_charges, h.born_charges, atol=1e-9)
    np.testing.assert_allclose(student.harmonic.epsilon_inf, h.epsilon_inf, atol=1e-9)
    # the stored IFCs are the teacher's short-range ones (the toy's springs), not the full ones
    by_cell = {tuple(c): k for k, c in enumerate(student.harmonic.ifc_cells)}
    for k, c in enumerate(h.ifc_cells):
        np.testing.assert_allclose(student.harmonic.ifc[by_cell[tuple(c)]], h.ifc[k], atol=1e-10)
    for mesh in ((2, 2, 2), (3, 3, 3), (4, 4, 4)):
        assert force_mismatch(teacher, student, mesh) < TIGHT, mesh
    # without Born charges the full IFCs are stored: exact on the phonopy supercell, wrong elsewhere
    log = Lines()
    full = harmonic_from_oracle(teacher.reference.to_atoms(), calc, HarmonicSettings(supercell=(2, 2, 2)), log=log)
    assert any(NO_BORN_MESSAGE in line for line in log) and full.metadata["dipdip"] is False
    assert force_mismatch(teacher, full, (2, 2, 2)) < TIGHT
    assert force_mismatch(teacher, full, (3, 3, 3)) > 1e-3


class BornCalculator(Calculator):
    """Wraps a calculator and also provides ASE's born_effective_charges and dielectric_tensor."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "born_effective_charges",
                              "dielectric_tensor"]

    def __init__(self, inner, born, eps):
        super().__init__()
        self.inner, self.born, self.eps = inner, born, eps

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms.copy()
        a.calc = self.inner
        self.results = {"energy": a.get_potential_energy(), "free_energy": a.get_potential_energy(),
                        "forces": a.get_forces(), "stress": a.get_stress(),
                        "born_effective_charges": self.born, "dielectric_tensor": self.eps}


def test_born_charges_from_the_calculator():
    teacher = toy_perovskite(dipole=True, anharmonic=False)
    h = teacher.harmonic
    calc = BornCalculator(SecondPrinciplesCalculator(teacher), h.born_charges, h.epsilon_inf)
    student = harmonic_from_oracle(teacher.reference.to_atoms(), calc, HarmonicSettings(supercell=(2, 2, 2)),
                                   log=None)
    assert student.metadata["born_source"].startswith("oracle")
    np.testing.assert_allclose(student.harmonic.born_charges, h.born_charges, atol=1e-12)
    assert force_mismatch(teacher, student, (3, 3, 3)) < TIGHT


# ----------------------------------------------------------------------------------------------------------------
# a real oracle: EMT
# ----------------------------------------------------------------------------------------------------------------
def cu3au(a=3.8):
    return Atoms("AuCu3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                 cell=np.eye(3) * a, pbc=True)


def test_relax_cubic_lattice_emt():
    cu = bulk("Cu", "fcc", a=3.7, cubic=True)
    relaxed = relax_cubic_lattice(cu, EMT(), tol=1e-8)
    relaxed.calc = EMT()
    stress = relaxed.get_stress()
    assert abs(stress[:3].mean()) < 1e-8 and np.abs(stress).max() < 1e-8
    assert relaxed.cell.lengths() == pytest.approx([3.5898] * 3, abs=1e-3)     # EMT's Cu lattice constant
    np.testing.assert_allclose(relaxed.get_scaled_positions(), cu.get_scaled_positions(), atol=1e-12)
    assert cu.cell.lengths() == pytest.approx([3.7] * 3)                      # input untouched
    # from a compressed start as well
    again = relax_cubic_lattice(bulk("Cu", "fcc", a=3.5, cubic=True), EMT(), tol=1e-8)
    assert again.cell.lengths() == pytest.approx(relaxed.cell.lengths(), abs=1e-6)
    # not a stationary point: refused
    bad = cu.copy()
    bad.positions[1] += [0.05, 0.0, 0.0]
    with pytest.raises(NotStationaryError, match="not a stationary point"):
        relax_cubic_lattice(bad, EMT())


@pytest.fixture(scope="module")
def emt_model():
    log = Lines()
    model = harmonic_from_oracle(cu3au(), EMT(), HarmonicSettings(supercell=(2, 2, 2), displacement=0.005), log=log)
    return model, log


def test_emt_end_to_end_forces(emt_model):
    model, log = emt_model
    assert any(NO_BORN_MESSAGE in line for line in log)
    meta = model.metadata
    assert meta["oracle"] == "EMT" and meta["residual_force_max"] < 1e-10
    assert meta["lattice_constant"] == pytest.approx(3.708, abs=5e-3)
    assert np.abs(meta["residual_stress"]).max() < 1e-5
    ref = model.reference.to_atoms()
    ref.calc = EMT()
    assert model.reference.energy == pytest.approx(ref.get_potential_energy(), abs=1e-12)
    # odd part of EMT's forces (cubic terms cancel) against the model on the phonopy supercell: O(u^2)
    calc = SecondPrinciplesCalculator(model)
    rng = np.random.default_rng(0)
    for amp, tol in ((0.02, 3e-2), (0.005, 2e-3)):
        atoms = model.supercell((2, 2, 2))
        u = rng.normal(0, amp, atoms.positions.shape)
        f_emt = []
        for sgn in (1, -1):
            a = atoms.copy()
            a.positions += sgn * u
            a.calc = EMT()
            f_emt.append(a.get_forces())
        odd = 0.5 * (f_emt[0] - f_emt[1])
        a = atoms.copy()
        a.positions += u
        a.calc = calc
        assert rel(a.get_forces(), odd) < tol, amp


def test_emt_gamma_hessian_and_elastic_constants(emt_model):
    model, _ = emt_model
    ref = model.reference.to_atoms()
    nat = len(ref)
    # Gamma: the unit cell's own Hessian by central differences (all images move together)
    h = 1e-3
    hess = np.zeros((nat, 3, nat, 3))
    for j in range(nat):
        for b in range(3):
            f = []
            for sgn in (1, -1):
                a = ref.copy()
                a.positions[j, b] += sgn * h
                a.calc = EMT()
                f.append(a.get_forces())
            hess[:, :, j, b] = -(f[0] - f[1]) / (2 * h)
    c0 = harmonic_dynamical_matrices(model.harmonic, model.reference, [[0, 0, 0]])[0]
    assert np.abs(c0.imag).max() < 1e-12
    assert rel(c0.real, hess) < 2e-4
    # elastic constants from energy-strain curves (engineering shear: eta_4 = 2 eps_yz)
    v0 = ref.get_volume()

    def energy(eta):
        a = ref.copy()
        a.set_cell(ref.cell.array @ (np.eye(3) + matrix_from_voigt(eta)).T, scale_atoms=True)
        a.calc = EMT()
        return a.get_potential_energy()

    s = 2e-3
    e0 = energy(np.zeros(6))
    c = model.harmonic.elastic
    for v in (0, 3):
        eta = np.zeros(6)
        eta[v] = s
        cvv = (energy(eta) + energy(-eta) - 2 * e0) / (v0 * s * s)
        assert c[v, v] == pytest.approx(cvv, rel=1e-3), v
    pp, pm = np.array([s, s, 0, 0, 0, 0]), np.array([s, -s, 0, 0, 0, 0])
    c12 = (energy(pp) - energy(pm) - energy(-pm) + energy(-pp)) / (4 * s * s * v0)
    assert c[0, 1] == pytest.approx(c12, rel=1e-3)
    # cubic: C11 = C22 = C33, C12 = C13 = C23, C44 = C55 = C66, the rest zero; Lambda = 0 (centrosymmetric sites)
    assert np.allclose(np.diag(c)[:3], c[0, 0]) and np.allclose(np.diag(c)[3:], c[3, 3])
    assert np.abs(c[:3, 3:]).max() < 1e-12 and np.abs(model.harmonic.internal_strain).max() < 1e-10


# ----------------------------------------------------------------------------------------------------------------
# failures and BORN files
# ----------------------------------------------------------------------------------------------------------------
class Flaky(Calculator):
    """Wraps a calculator; ``bad(atoms)`` returns None, 'raise' or 'nan' for each configuration."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, inner, bad):
        super().__init__()
        self.inner, self.bad = inner, bad

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        action = self.bad(self.atoms)
        if action == "raise":
            raise RuntimeError("SCF not converged")
        a = self.atoms.copy()
        a.calc = self.inner
        forces = a.get_forces()
        if action == "nan":
            forces = forces.copy()
            forces[0, 0] = np.nan
        self.results = {"energy": a.get_potential_energy(), "free_energy": a.get_potential_energy(),
                        "forces": forces, "stress": a.get_stress()}


def _sheared(atoms):
    cell = atoms.cell.array
    return abs(cell[1, 2]) + abs(cell[2, 1]) > 1e-8


def _displaced_supercell(atoms):
    x = atoms.get_scaled_positions() * 4          # the undisplaced 2x2x2 toy supercell sits on multiples of 1/4
    return len(atoms) > 5 and np.abs(x - np.round(x)).max() > 1e-6


@pytest.mark.parametrize("bad, match", [
    (lambda a: "raise" if _sheared(a) else None, r"elastic and internal strain.*eta_4 \(yz\).*SCF not converged"),
    (lambda a: "nan" if _sheared(a) else None, r"elastic and internal strain.*eta_4.*non-finite forces"),
    (lambda a: "raise" if _displaced_supercell(a) else None, r"force constants.*displacement 1/\d+.*SCF not"),
    (lambda a: "nan" if _displaced_supercell(a) else None, r"force constants.*displacement 1/\d+.*non-finite"),
    (lambda a: "raise" if len(a) == 5 and not _sheared(a) else None, r"lattice relaxation.*SCF not converged"),
])
def test_oracle_failures_name_the_step(bad, match):
    teacher = toy_perovskite(dipole=False, anharmonic=False)
    calc = Flaky(SecondPrinciplesCalculator(teacher), bad)
    with pytest.raises(OracleError, match=match) as err:
        harmonic_from_oracle(teacher.reference.to_atoms(), calc, HarmonicSettings(supercell=(2, 2, 2)), log=None)
    assert isinstance(err.value, RuntimeError)


def test_non_stationary_reference_refused():
    teacher = toy_perovskite(dipole=False, anharmonic=False)
    atoms = teacher.reference.to_atoms()
    atoms.positions[1] += [0.02, 0.0, 0.0]
    with pytest.raises(NotStationaryError, match="not a stationary point"):
        harmonic_from_oracle(atoms, SecondPrinciplesCalculator(teacher),
                             HarmonicSettings(relax_lattice=False), log=None)


def test_progress_logs_every_oracle_call():
    teacher = toy_perovskite(dipole=False, anharmonic=False)
    log = Lines()
    model = harmonic_from_oracle(teacher.reference.to_atoms(), SecondPrinciplesCalculator(teacher),
                                 HarmonicSettings(supercell=(2, 2, 2)), log=log, progress=True)
    calls = [line for line in log if line.startswith("  [") and "oracle call" in line]
    assert len(calls) == model.metadata["n_oracle_calls"] > 12
    assert any("displacement 1/" in line for line in calls) and any("strain eta_6" in line for line in calls)


def test_read_phonopy_born(tmp_path):
    teacher = toy_perovskite(dipole=True)
    atoms = teacher.reference.to_atoms()
    z, eps = teacher.harmonic.born_charges, teacher.harmonic.epsilon_inf
    path = tmp_path / "BORN"
    write_born(path, z, eps, [0, 1, 2])
    born, epsilon = read_phonopy_born(path, atoms)
    np.testing.assert_allclose(born, z, atol=1e-9)          # O2, O3 obtained from O1 by the cubic symmetry
    np.testing.assert_allclose(epsilon, eps, atol=1e-12)
    assert born[3, 1, 1] == pytest.approx(-5.8) and born[4, 0, 0] == pytest.approx(-5.8)   # Z_par on the bond axis
    # too many atoms (all five listed instead of the three independent ones)
    write_born(path, z, eps, range(5))
    with pytest.raises(ValueError, match="BORN"):
        read_phonopy_born(path, atoms)
    with pytest.raises(FileNotFoundError):
        read_phonopy_born(tmp_path / "missing", atoms)
