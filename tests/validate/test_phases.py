"""Metastable phases (Table 2): distortion patterns, their space groups, relaxation under symmetry."""
from pathlib import Path

import numpy as np
import pytest

from sp_server.model.native import load_model
from sp_server.otf.structures import PHASES, _cells, phase_structure, polar_patterns, soft_pattern
from sp_server.potential import SupercellPotential
from sp_server.validate.ground_state import ground_state, model_calculator
from sp_server.validate.phases import amplitudes, relax_phase, space_group

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "models" / "toy_perovskite.h5"
BTO = ROOT / "models" / "BaTiO3_chgnet" / "model.h5"


@pytest.fixture(scope="module")
def toy():
    return load_model(TOY)


@pytest.mark.parametrize("path", [TOY, BTO], ids=["toy", "BaTiO3"])
def test_each_pattern_has_its_space_group(path):
    model = load_model(path)
    for name in PHASES:
        assert space_group(phase_structure(model, name)).startswith(name + " ("), name


@pytest.mark.parametrize("q, alpha", [((0, 0, 0), 2), ((0.5, 0, 0), 2), ((0.5, 0.5, 0), 2), ((0, 0.5, 0), 0),
                                      ((0.5, 0, 0.5), 1)])
def test_soft_pattern_is_a_harmonic_eigenmode(toy, q, alpha):
    """Frozen into the 2x2x2 supercell, the pattern's harmonic forces are -omega^2 M u on every atom."""
    mesh = (2, 2, 2)
    p = soft_pattern(toy, q, alpha)
    assert np.abs(p).max() == pytest.approx(1.0) and p[np.argmax(np.abs(p))] > 0
    wave = np.cos(2 * np.pi * _cells(mesh) @ np.asarray(q, float))
    u = np.zeros((8, toy.natoms, 3))
    u[:, :, alpha] = 1e-3 * wave[:, None] * p[None, :]
    pot = SupercellPotential(toy, mesh, parts=("short_range", "dipole_dipole"))
    shape = mesh + (toy.natoms, 3)
    f = -pot.evaluate(u.reshape(shape), np.zeros(6)).grad_u.reshape(8, toy.natoms, 3)
    mu = toy.reference.masses[None, :, None] * u
    w2 = -np.sum(f * u) / np.sum(mu * u)
    assert np.allclose(f, -w2 * mu, atol=1e-9 + 1e-6 * np.abs(f).max())


def test_gamma_patterns_are_the_polar_patterns(toy):
    assert np.allclose(np.abs(polar_patterns(toy)), np.abs([soft_pattern(toy, (0, 0, 0), a) for a in range(3)]))


def test_zone_boundary_transverse_q_only(toy):
    with pytest.raises(ValueError, match="zone-boundary"):
        soft_pattern(toy, (0.25, 0, 0), 2)
    with pytest.raises(ValueError, match="polarisation axis"):     # longitudinal at X: mixes with x, y
        soft_pattern(toy, (0, 0, 0.5), 2)


def test_amplitudes_of_a_pure_wave(toy):
    mesh = (2, 2, 1)
    part = np.random.default_rng(0).normal(size=(toy.natoms, 3))
    for q in [(0.5, 0, 0), (0.5, 0.5, 0), (0, 0, 0)]:
        u = np.cos(2 * np.pi * _cells(mesh) @ np.asarray(q))[:, None, None] * part[None]
        amp = amplitudes(toy, mesh, u)
        assert list(amp) == ["q=(" + ",".join(f"{x:g}" for x in q) + ")"]
        assert next(iter(amp.values())) == pytest.approx(np.linalg.norm(part))


def test_relaxed_phases_of_the_toy(toy):
    calc = model_calculator(toy)
    r3m = relax_phase(toy, calc, "model", "R3m")
    gs = ground_state(toy, calc, "model", "R", fmax=1e-3)
    assert r3m.kept_symmetry and r3m.space_group.startswith("R3m")
    assert r3m.energy_mev == pytest.approx(gs.energy_mev, abs=0.05)
    pmma = relax_phase(toy, calc, "model", "Pmma")
    assert pmma.kept_symmetry and pmma.converged and pmma.energy_mev < 0
    assert set(pmma.amplitudes) == {"q=(0.5,0,0)"}                    # antipolar: no net polar displacement
    # the toy's M-point chain mode is stable: P4/nmm relaxes back to cubic, and the result says so
    p4nmm = relax_phase(toy, calc, "model", "P4/nmm")
    assert not p4nmm.kept_symmetry and p4nmm.space_group.startswith("Pm-3m")
    assert abs(p4nmm.energy_mev) < 1e-3
    with pytest.raises(ValueError, match="unknown phase"):
        relax_phase(toy, calc, "model", "Pnma")


def test_a_failed_relaxation_is_reported_and_the_other_phases_go_on(toy, tmp_path):
    """A model relaxation that leaves the model's range (a hole along that phase's path: a rebuilt BaTiO3 model's
    P4/nmm ran to 25% strain) is that phase's result, named in the table; the other phases are reported."""
    from ase.calculators.calculator import Calculator, all_changes

    from sp_server.model.mapping import MappingError
    from sp_server.validate.phases import metastable_phases
    from sp_server.validate.run import _item_metastable, _section_metastable

    class HoleOnM(Calculator):
        implemented_properties = ["energy", "forces", "stress"]

        def __init__(self):
            super().__init__()
            self.inner = model_calculator(toy)

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            if len(atoms) == 4 * toy.natoms:       # the 2x2x1 cells of P4/nmm and Pbcm
                raise MappingError("cell cannot be mapped: strain component 0.256 exceeds max_strain=0.25")
            self.inner.calculate(atoms, properties, system_changes)
            self.results = dict(self.inner.results)

    logs = []
    calcs = {"model": HoleOnM(), "other": model_calculator(toy)}
    res = metastable_phases(toy, calcs, ("P4/nmm", "R3m"), log=logs.append)
    assert isinstance(res["P4/nmm"]["model"], str) and "0.256" in res["P4/nmm"]["model"]
    assert res["P4/nmm"]["other"].phase == "P4/nmm" and res["R3m"]["model"].kept_symmetry
    assert any("P4/nmm with model: FAILED (MappingError" in m for m in logs)

    from types import SimpleNamespace
    ctx = SimpleNamespace(model=toy, calcs=calcs, log=logs.append, progress=False, out=tmp_path,
                          settings=SimpleNamespace(metastable=("P4/nmm", "R3m"), metastable_fmax=2e-3))
    data = _item_metastable(ctx)
    assert data["P4/nmm"]["model"] == {"error": res["P4/nmm"]["model"]}
    text = "\n".join(_section_metastable(data))
    assert "| P4/nmm | 2x2x1 | - |" in text and "relaxation FAILED" in text and "- P4/nmm with model: MappingError" in text
    assert (tmp_path / "metastable.png").stat().st_size > 0
    assert "P4/nmm,failed" in (tmp_path / "metastable.csv").read_text()
