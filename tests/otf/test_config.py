"""The loop's TOML configuration: defaults, relative paths, and errors that name the file, section and key."""
from pathlib import Path

import pytest

from sp_server.otf.config import ConfigError, OtfConfig


def write(tmp_path, text) -> Path:
    path = tmp_path / "otf.toml"
    path.write_text(text)
    return path


def test_defaults_and_relative_paths(tmp_path):
    cfg = OtfConfig.load(write(tmp_path, 'run_dir = "out"\n[oracle]\nname = "abinit"\necut_ha = 12\n'
                                         '[system]\nstructure = "cell.cif"\n[md]\ntimestep_fs = 2\n'))
    assert cfg.run_dir == (tmp_path / "out").resolve()
    assert cfg.oracle == "abinit" and cfg.oracle_options == {"ecut_ha": 12}
    assert cfg.system.structure == str(tmp_path.resolve() / "cell.cif")
    assert cfg.md.timestep_fs == 2.0 and isinstance(cfg.md.timestep_fs, float)   # an int is a float here
    assert cfg.loop.temperatures == [15, 50, 100, 150, 200, 250, 300]               # the paper's ramp
    assert cfg.md.steps == 1000 and cfg.md.phases == ["R", "O", "T"] and cfg.terms.select == 96
    assert cfg.terms.sp_pairs == [] and cfg.fit.energy_scale == 1e-3
    assert cfg.fit.bound_md_supercell == [4, 4, 4] and cfg.fit.bound_md_steps == 300 and cfg.fit.bound_pair_wall == 0.0
    assert cfg.fit.bound_chains is False


@pytest.mark.parametrize("text, message", [
    ("[loop]\ntemprature = [10]\n", r"unknown key 'temprature' in \[loop\]"),
    ("[mdd]\nsteps = 3\n", r"unknown section \[mdd\]"),
    ("[terms]\nsp_pairs = [[3, 1], [4]]\n", r"\[terms\] sp_pairs must be \[displacement order, strain power\]"),
    ("[terms]\nsp_pairs = [3, 1]\n", r"\[terms\] sp_pairs must be"),
    ("[md]\nsteps = \"many\"\n", r"\[md\] steps must be int, got 'many'"),
    ("[md]\nphases = \"R\"\n", r"\[md\] phases must be list"),
    ("[loop]\ntemperatures = [300, 15]\n", "positive and increasing"),
    ("[loop]\nthreshold = \"force=0.1\"\n", r"\[loop\] threshold"),
    ("[loop]\nthreshold_mode = \"adaptive\"\n", "absolute' or 'relative'"),
    ("[md]\nphases = [\"R\", \"X\"]\n", "among R, O, T, C"),
    ("[oracle]\necut_ha = 10\n", r"\[oracle\] needs name"),
    ("[md\nsteps = 3\n", "not valid TOML"),
    ("[fit]\nbound_md_supercell = [6, 6]\n", r"\[fit\] bound_md_supercell must be three positive integers"),
    ("[fit]\nbound_pair_wall = -1.0\n", r"bound_pair_wall >= 0"),
])
def test_bad_configuration_names_what_is_wrong(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        OtfConfig.load(path)
    assert str(path) in str(err.value)


def test_final_supercell_stage_extends_the_schedule(tmp_path):
    from sp_server.otf.loop import OnTheFly
    cfg = OtfConfig.load(write(tmp_path, '[loop]\ntemperatures = [15, 300]\nfinal_supercell = [4, 4, 4]\n'))
    otf = OnTheFly(cfg, progress=False, log=lambda m: None)
    assert otf.schedule() == [(15.0, (2, 2, 2)), (300.0, (2, 2, 2)), (300.0, (4, 4, 4))]
    otf.state.update(t_index=1, iteration=3)
    assert otf._iteration_key() == "T0300.0_it03"
    otf.state.update(t_index=2, iteration=0)
    assert otf._iteration_key() == "T0300.0_4x4x4_it00" and otf.md_supercell == (4, 4, 4)
    with pytest.raises(ConfigError, match="final_temperatures needs final_supercell"):
        OtfConfig.load(write(tmp_path, '[loop]\nfinal_temperatures = [300]\n'))
    with pytest.raises(ConfigError, match="three positive integers"):
        OtfConfig.load(write(tmp_path, '[loop]\nfinal_supercell = [4, 4]\n'))


def test_notes_say_when_md_cells_outgrow_the_harmonic_supercell(tmp_path):
    cfg = OtfConfig.load(write(tmp_path, '[loop]\nfinal_supercell = [4, 4, 4]\nfinal_temperatures = [300]\n'))
    notes = cfg.notes()
    assert len(notes) == 1 and "[loop] final_supercell [4, 4, 4]" in notes[0] and "[2, 2, 2]" in notes[0]
    cfg = OtfConfig.load(write(tmp_path, '[harmonic]\nsupercell = [4, 4, 4]\n[loop]\nfinal_supercell = [4, 4, 4]\n'
                                         'final_temperatures = [300]\n'))
    assert cfg.notes() == []


def test_bound_settings_follow_the_fit_section(tmp_path):
    """What the loop's boundedness check gets from [fit]: the chain backgrounds only with bound_chains."""
    from sp_server.model.toy import toy_perovskite
    from sp_server.otf.loop import OnTheFly
    toy = toy_perovskite()
    cfg = OtfConfig.load(write(tmp_path, '[loop]\ntemperatures = [15, 300]\n'))
    plain = OnTheFly(cfg, progress=False, log=lambda m: None).bound_settings(toy)
    assert plain.md_temperature == 600.0 and plain.md_mesh == (4, 4, 4) and plain.pair_wall == 0.0
    assert [name for name, _ in plain.backgrounds] == [f"{p} polar {a} A" for p in "ROT" for a in (0.1, 0.2)]
    cfg = OtfConfig.load(write(tmp_path, '[fit]\nbound_chains = true\nbound_md_supercell = [6, 6, 6]\n'
                                         'bound_pair_wall = 1.0\nbound_relax_strain = 0.15\n'))
    full = OnTheFly(cfg, progress=False, log=lambda m: None).bound_settings(toy)
    names = [name for name, _ in full.backgrounds]
    assert names[:6] == [name for name, _ in plain.backgrounds] and len(names) == 10
    assert {n.split(" chains")[0] for n in names[6:]} == {"P4/nmm", "Pmma", "Cmcm", "Pbcm"}
    assert full.md_mesh == (6, 6, 6) and full.pair_wall == 1.0 and full.relax_max_strain == 0.15
