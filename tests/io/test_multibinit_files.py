"""MULTIBINIT XML files: round trips and clear errors for malformed input (no multibinit binary needed)."""
import numpy as np
import pytest

from sp_server.io.multibinit import (MultibinitFormatError, export_multibinit, import_multibinit,
                                     read_coefficients_xml, read_system_xml)
from tests.conftest import random_model

from .test_multibinit_parity import REF


def test_round_trip_through_multibinit_xml(tmp_path, toy):
    sys_xml, coeffs = export_multibinit(toy, tmp_path / "toy")
    back = import_multibinit(system=sys_xml, coefficients=coeffs)
    assert np.allclose(back.reference.cell, toy.reference.cell, atol=1e-12)
    assert np.allclose(back.harmonic.elastic, toy.harmonic.elastic, rtol=1e-12)
    assert np.allclose(back.harmonic.born_charges, toy.harmonic.born_charges)
    assert np.allclose(back.anharmonic.values, toy.anharmonic.values, rtol=1e-12)
    assert back.anharmonic.coefficients == toy.anharmonic.coefficients
    # the force constants come back on the same cells (zero blocks aside)
    a = dict(zip(map(tuple, toy.harmonic.ifc_cells), toy.harmonic.ifc))
    b = dict(zip(map(tuple, back.harmonic.ifc_cells), back.harmonic.ifc))
    assert max(np.abs(a[c] - b[c]).max() for c in a) < 1e-10


def test_round_trip_low_symmetry_with_internal_strain(tmp_path):
    model = random_model(4)
    sys_xml, coeffs = export_multibinit(model, tmp_path / "rand")
    back = import_multibinit(system=sys_xml, coefficients=coeffs, numbers=model.reference.numbers)
    assert np.allclose(back.harmonic.internal_strain, model.harmonic.internal_strain, atol=1e-10)
    assert np.allclose(back.harmonic.born_charges, model.harmonic.born_charges)
    assert np.allclose(back.harmonic.epsilon_inf, model.harmonic.epsilon_inf)


@pytest.mark.skipif(not REF.exists(), reason="shared reference data not present")
def test_bahfo3_coefficients():
    anh = read_coefficients_xml(REF / "BaHfO3.xml", natoms=5)
    assert len(anh) == 99
    assert sum(len(c.terms) for c in anh.coefficients) == 1142
    assert anh.coefficients[0].name == "(Ba_y-O1_y)^2(eta_1)^1"


def _coeff_xml(tmp_path, body):
    p = tmp_path / "c.xml"
    p.write_text('<?xml version="1.0" ?>\n<Heff_definition>\n' + body + "\n</Heff_definition>\n")
    return p


TERM = ('<coefficient number="1" value="0.1" text="t"><term weight="1.0">'
        '<displacement_diff atom_a="{a}" atom_b="1" direction="{d}" power="2"><cell_a>0 0 0</cell_a>'
        '<cell_b>0 0 0</cell_b></displacement_diff></term></coefficient>')


@pytest.mark.parametrize("body,message", [
    (TERM.format(a=7, d="x"), "coefficient 1, term 1: atom index 7 outside the reference cell"),
    (TERM.format(a=0, d="w"), "coefficient 1, term 1: malformed term"),
    (TERM.format(a=0, d="x").replace('value="0.1"', ""), "coefficient 1: missing or invalid value"),
    (TERM.format(a=0, d="x").replace("<cell_a>0 0 0</cell_a>", ""), "malformed term"),
    ('<coefficient number="3" value="1.0" text="t"></coefficient>', "coefficient 3 has no <term>"),
    ("", "no <coefficient> elements"),
])
def test_coefficient_errors(tmp_path, body, message):
    with pytest.raises(MultibinitFormatError) as err:
        read_coefficients_xml(_coeff_xml(tmp_path, body), natoms=5)
    assert message in str(err.value) and "c.xml" in str(err.value)


def test_truncated_and_wrong_files(tmp_path, toy):
    sys_xml, coeffs = export_multibinit(toy, tmp_path / "toy")
    text = sys_xml.read_text()
    cut = tmp_path / "cut_sys.xml"
    cut.write_text(text[: len(text) // 2])
    with pytest.raises(MultibinitFormatError, match="cut_sys.xml: malformed XML"):
        read_system_xml(cut)
    with pytest.raises(MultibinitFormatError, match="expected <System_definition>"):
        read_system_xml(coeffs)
    bad = tmp_path / "bad_sys.xml"
    bad.write_text(text.replace('units="hartree"', 'units="eV"', 1))
    with pytest.raises(MultibinitFormatError, match="<elastic> has units 'eV'"):
        read_system_xml(bad)
    bad.write_text(text.replace("<unit_cell", "<unit_cellx", 1).replace("</unit_cell>", "</unit_cellx>", 1))
    with pytest.raises(MultibinitFormatError, match="missing <unit_cell>"):
        read_system_xml(bad)
    nan = tmp_path / "nan_sys.xml"
    lines = text.splitlines()
    k = next(i for i, line in enumerate(lines) if "<data>" in line) + 1
    lines[k] = lines[k].replace(lines[k].split()[0], "abc", 1)
    nan.write_text("\n".join(lines))
    with pytest.raises(MultibinitFormatError, match="local_force_constant 0 data> contains non-numeric text"):
        read_system_xml(nan)
    with pytest.raises(MultibinitFormatError, match="no such file"):
        read_system_xml(tmp_path / "absent.xml")


def test_strain_dependent_force_constants_round_trip(tmp_path):
    """<correction_force_constant> blocks: exported, read back (dPhi/deta_v, the Taylor term) and saved in the
    model file unchanged; the multibinit-exact import refuses them (multibinit 9.6.2 evaluates them
    inconsistently, docs/multibinit.md); <correction_strain_force_constant>, which multibinit never reads, is
    refused when non-zero."""
    from sp_server.model.native import load_model, save_model
    from sp_server.model.toy import toy_perovskite
    from tests.model.test_finite_differences import with_strain_ifc
    model = with_strain_ifc(toy_perovskite())
    sys_xml, _ = export_multibinit(model, tmp_path / "sifc")
    assert sys_xml.read_text().count("<correction_force_constant") > 6
    back = import_multibinit(system=sys_xml, numbers=model.reference.numbers)
    h, hb = model.harmonic, back.harmonic
    assert hb.has_strain_ifc
    a = {tuple(c): h.strain_ifc[:, k] for k, c in enumerate(h.strain_ifc_cells)}
    b = {tuple(c): hb.strain_ifc[:, k] for k, c in enumerate(hb.strain_ifc_cells)}
    assert max(np.abs(a[c] - b.get(c, 0)).max() for c in a) < 1e-10 * np.abs(h.strain_ifc).max()
    path = save_model(back, tmp_path / "m.h5")
    again = load_model(path).harmonic
    assert np.array_equal(again.strain_ifc, hb.strain_ifc) and np.array_equal(again.strain_ifc_cells,
                                                                                hb.strain_ifc_cells)
    with pytest.raises(MultibinitFormatError, match="multibinit-exactly"):
        read_system_xml(sys_xml, numbers=model.reference.numbers, exact=True)
    text = sys_xml.read_text().replace("correction_force_constant", "correction_strain_force_constant")
    (tmp_path / "other.xml").write_text(text)
    with pytest.raises(MultibinitFormatError, match="correction_strain_force_constant"):
        read_system_xml(tmp_path / "other.xml", numbers=model.reference.numbers)
