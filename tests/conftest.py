"""Shared fixtures: the toy perovskite and a random low-symmetry model that exercises every code path."""
import numpy as np
import pytest

from sp_server.model import (AnharmonicPart, Coefficient, DisplacementDiff, HarmonicPart, Model, Reference,
                             StrainFactor, Term)
from sp_server.model.toy import toy_perovskite


def random_model(seed=0, dipole=True, nterms=6):
    """3 atoms in a triclinic cell, random (valid) IFCs, Born charges, eps, internal strain and random terms."""
    rng = np.random.default_rng(seed)
    cell = np.array([[3.9, 0.1, 0.0], [0.3, 4.2, 0.1], [-0.2, 0.25, 4.4]])
    frac = np.array([[0.0, 0.0, 0.0], [0.45, 0.55, 0.5], [0.5, 0.1, 0.6]])
    nat = 3
    cells = [c for c in np.ndindex(3, 3, 3)]
    cells = [tuple(np.array(c) - 1) for c in cells]
    blocks = {c: np.zeros((nat, 3, nat, 3)) for c in cells}
    for c in cells:
        if c < tuple(-np.array(c)):
            continue
        blk = rng.normal(0, 0.3, (nat, 3, nat, 3)) * np.exp(-np.linalg.norm(c))
        if c == (0, 0, 0):
            blk = 0.5 * (blk + blk.transpose(2, 3, 0, 1))
        blocks[c] = blk
        blocks[tuple(-np.array(c))] = blk.transpose(2, 3, 0, 1)
    ifc_cells = np.array(cells)
    ifc = np.array([blocks[c] for c in cells])
    ifc[13] += np.einsum("ij,ab->iajb", np.eye(nat), 5.0 * np.eye(3))  # make it comfortably stable-ish
    elastic = rng.normal(0, 0.2, (6, 6))
    elastic = elastic @ elastic.T + np.eye(6)
    lam = rng.normal(0, 0.5, (nat, 3, 6))
    born = eps = None
    if dipole:
        born = rng.normal(0, 1.0, (nat, 3, 3)) + 2 * np.eye(3)
        born -= born.mean(axis=0)
        a = rng.normal(0, 0.3, (3, 3))
        eps = 4 * np.eye(3) + a @ a.T
    harmonic = HarmonicPart(ifc_cells, ifc, elastic, lam, born, eps)
    harmonic.impose_asr()
    coefs = []
    for z in range(nterms):
        terms = []
        for _ in range(rng.integers(1, 4)):
            nd = rng.integers(0 if z % 3 == 2 else 1, 4)
            disps = []
            for _ in range(nd):
                a = int(rng.integers(nat))
                b = (a + int(rng.integers(1, nat))) % nat  # two different atoms: never identically zero
                disps.append(DisplacementDiff(a, tuple(rng.integers(-1, 2, 3)), b, tuple(rng.integers(-1, 2, 3)),
                                              int(rng.integers(3)), int(rng.integers(1, 4))))
            disps = tuple(disps)
            strains = tuple(StrainFactor(int(rng.integers(1, 7)), int(rng.integers(1, 3)))
                            for _ in range(rng.integers(0 if nd else 1, 3)))
            terms.append(Term(float(rng.normal()), disps, strains))
        coefs.append(Coefficient(tuple(terms), name=f"random {z}"))
    values = rng.normal(0, 1.0, nterms)
    ref = Reference(cell, frac @ cell, [56, 22, 8], [137.3, 47.9, 16.0], energy=-12.5)
    return Model(ref, harmonic, AnharmonicPart(coefs, values), name="random")


def displaced(model, mesh, seed=1, amp=0.08, strain=0.02, rotate=True):
    """A randomly displaced, strained and (optionally) rigidly rotated supercell of ``model``."""
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(seed)
    atoms = model.supercell(mesh)
    atoms.positions += rng.normal(0, amp, atoms.positions.shape)
    F = np.eye(3) + strain * rng.normal(size=(3, 3))
    if rotate:
        F = Rotation.from_rotvec(rng.normal(0, 0.5, 3)).as_matrix() @ F
    atoms.set_cell(atoms.cell.array @ F.T, scale_atoms=True)
    return atoms


def kill_at_marker(cmd, marker, *, limit: float, what: str):
    """Start ``cmd``, wait until it creates ``marker`` (its injected pause: the fault point), SIGKILL it there and
    return the dead process.  Fails if it dies before the marker or does not reach it in ``limit`` seconds (``what``
    names the point in the messages)."""
    import os
    import signal
    import subprocess
    import time
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the process died before {what}: {proc.stdout.read()}")
            assert time.monotonic() - t0 < limit, f"the process never reached {what}"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc


@pytest.fixture(scope="session")
def toy():
    return toy_perovskite()


@pytest.fixture(scope="session")
def fitted_toy(toy):
    """A model fitted to ten noisy frames of the toy perovskite (tests.fit.test_bayes.noisy_data): its posterior
    gives Bayesian errors; the server, queue and loop tests share it."""
    from sp_server.fit.fit import fit_model
    from sp_server.model import AnharmonicPart, Model
    from tests.fit.test_bayes import noisy_data
    base = Model(toy.reference, toy.harmonic, AnharmonicPart(), name="toy-harmonic")
    model, _ = fit_model(noisy_data(toy, 10, seed=11), base, toy.anharmonic.coefficients, progress=False,
                         log=lambda *a: None)
    return model


@pytest.fixture(scope="session")
def rand_model():
    return random_model()
