"""A tiny fit from a real oracle (ASE's EMT on cubic Cu3Au): harmonic part, generated terms, selection, posterior."""
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from sp_server import SecondPrinciplesCalculator
from sp_server.fit.fit import fit_model
from sp_server.fit.generate import GeneratorSettings, generate_terms
from sp_server.fit.harmonic import HarmonicSettings, harmonic_from_oracle


def labelled(model, n, seed, amp=0.07, strain=0.01):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = model.supercell((2, 2, 2))
        atoms.positions += rng.normal(0, amp, atoms.positions.shape)
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain * rng.normal(size=(3, 3))), scale_atoms=True)
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        a = atoms.copy()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        out.append((f"EMT frame {seed}-{k}", a))
    return out


def force_rmse(model, frames):
    calc = SecondPrinciplesCalculator(model)
    err = []
    for _, a in frames:
        b = a.copy()
        b.calc = calc
        err.append(b.get_forces() - a.get_forces())
    return float(np.sqrt(np.mean(np.square(err))))


@pytest.fixture(scope="module")
def emt_harmonic():
    atoms = Atoms("AuCu3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                  cell=np.eye(3) * 3.8, pbc=True)
    return harmonic_from_oracle(atoms, EMT(), HarmonicSettings(supercell=(2, 2, 2)), log=lambda *a: None)


def test_fit_from_emt(emt_harmonic):
    pool = generate_terms(emt_harmonic.reference, GeneratorSettings(cutoff=2.8, orders=(3, 4), max_bodies=2,
                                                                     sp_orders=(2,), strain_powers=(1,)))
    train, test = labelled(emt_harmonic, 40, seed=1, amp=0.05), labelled(emt_harmonic, 8, seed=2, amp=0.05)
    model, report = fit_model(train, emt_harmonic, pool, select=30, progress=False, log=lambda *a: None)
    assert len(model.anharmonic) == 30 and model.posterior is not None
    before, after = force_rmse(emt_harmonic, test), force_rmse(model, test)
    print(f"held-out force RMSE: harmonic {before:.4f} eV/A, fitted {after:.4f} eV/A; sigma_v {report.sigma_v:.3f}")
    assert after < 0.25 * before  # measured: 0.120 -> 0.016 eV/A
    # the Bayesian error is larger for frames further from the training data
    far = labelled(emt_harmonic, 1, seed=3, amp=0.2)[0][1]
    near = test[0][1]
    errs = []
    for a in (near, far):
        b = a.copy()
        b.calc = SecondPrinciplesCalculator(model, errors=True)
        b.get_potential_energy()
        errs.append(b.calc.results["bayesian_error"]["force_max"])
    assert errs[1] > errs[0]
