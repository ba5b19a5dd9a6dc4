"""The on-the-fly loop's configuration: a TOML file read into dataclasses, every field with its unit and default.

Unknown sections or keys are an error naming them (a typo must not silently fall back to a default).  Relative
paths are relative to the configuration file.  See docs/otf.md for a commented example.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional


class ConfigError(ValueError):
    pass


def _typed(value, default, where: str):
    """``value`` checked against the type of the field's default (an int is accepted for a float)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where} must be {type(default).__name__}, got {value!r}")
    return value


@dataclass
class SystemConfig:
    structure: str = "BaTiO3"     # "BaTiO3" (cubic perovskite, Ba at 0, Ti at the centre, O at face centres)
                                  # or a file ase.io reads (the reference unit cell)
    a: float = 4.0                # A, starting lattice constant of the built-in cubic cell


@dataclass
class HarmonicConfig:
    supercell: list = field(default_factory=lambda: [2, 2, 2])  # phonopy supercell for the force constants
    relax_lattice: bool = True    # cubic lattice constant relaxed with the oracle first
    displacement: float = 0.01    # A
    strain_step: float = 0.005
    born: str = ""                # optional phonopy BORN file (Born charges, eps_inf): dipole-dipole part


@dataclass
class TermsConfig:
    cutoff_factor: float = 0.7072  # bond cutoff in units of the relaxed lattice constant (sqrt(2)/2 a0: paper)
    orders: list = field(default_factory=lambda: [3, 4, 5, 6])
    max_bodies: int = 2
    strain_phonon: bool = True
    strain_powers: list = field(default_factory=lambda: [1, 2])  # u^n eta and u^n eta^2 couplings for every
    sp_orders: list = field(default_factory=lambda: [1, 2])        # n of sp_orders (u eta, u^2 eta, u^2 eta^2)
    sp_pairs: list = field(default_factory=list)  # and these [n, q] pairs, e.g. [[3, 1], [4, 1]] for u^3 eta and
                                  # u^4 eta: the couplings that carry the strain of the polar phases (held-out stress
                                  # 0.44 -> 0.14 GPa, forces 0.10 -> 0.06 eV/A on a demo's data, docs/otf.md); the
                                  # demo uses them with [initial] polar_strains and [fit] bound_relax_strain, without
                                  # which the loop's NPT MDs ran away along the strain (not the default yet)
    pure_strain: list = field(default_factory=lambda: [3, 4])
    even_top_order: bool = True   # highest order: only products of even powers (x^6, x^4 y^2), see fit.generate
    select: int = 96              # at most this many coefficients kept by forward selection at every refit
                                  # (paper: 96; with sp_pairs [[3, 1], [4, 1]] the evidence still rises at 150,
                                  # and 150 -> 300 lowers the held-out errors by 10-20% only)
    select_by: str = "evidence"   # "evidence": the count along the selection path where the log evidence is
                                  # largest (few data, few terms); "count": always ``select`` of them

    def generator_settings(self, a0: float):
        """The term generator's settings for a reference of cubic-equivalent lattice constant ``a0`` (A)."""
        from ..fit.generate import GeneratorSettings
        return GeneratorSettings(cutoff=self.cutoff_factor * a0, orders=tuple(self.orders),
                                 max_bodies=self.max_bodies, strain_phonon=self.strain_phonon,
                                 strain_powers=tuple(self.strain_powers), sp_orders=tuple(self.sp_orders),
                                 pure_strain=tuple(self.pure_strain), sp_pairs=tuple(tuple(p) for p in self.sp_pairs),
                                 even_top_order=bool(self.even_top_order))


@dataclass
class InitialConfig:
    amplitudes: list = field(default_factory=lambda: [0.04, 0.08, 0.12, 0.16, 0.2])  # A, largest displacement
    modes_per_q: int = 2          # lowest (incl. unstable) modes per commensurate q-point of the MD supercell
    strains: list = field(default_factory=lambda: [0.005, 0.01, 0.02])  # homogeneous strain magnitudes
    mixed: int = 12               # random combinations of low modes and strains
    polar_amplitudes: list = field(default_factory=lambda: [0.05, 0.1, 0.15, 0.2, 0.25])  # A: the soft mode along
                                  # 111, 110, 001 (the R, O, T wells, unit cell) at these largest displacements
    polar_strains: list = field(default_factory=list)  # e.g. [-0.01, 0.02, 0.04, 0.07]: the polar cells strained
                                  # along their symmetry, uniaxially along the polar axis (s d d^T) and in volume
                                  # (s/3 on each axis), s from this list
    polar_strain_amplitudes: list = field(default_factory=lambda: [0.1, 0.2])  # A, of those polar cells
    chain_amplitudes: list = field(default_factory=list)  # A, e.g. [0.1, 0.15, 0.2]: the polar-chain patterns of
                                  # the metastable phases (soft modes at X, M, Gamma: P4/nmm, Pmma, ..., R3m) on
                                  # their smallest supercells at these largest displacements
    rattled: int = 24             # randomly displaced supercells (thermal-like local distortions), see
    rattle_amplitudes: list = field(default_factory=lambda: [0.04, 0.08, 0.12])  # otf.structures; RMS per atom, A
    seed: int = 0


@dataclass
class MDConfig:
    supercell: list = field(default_factory=lambda: [2, 2, 2])
    phases: list = field(default_factory=lambda: ["R", "O", "T"])  # polar starting structures along 111/110/001
    steps: int = 1000
    timestep_fs: float = 1.0
    pressure_gpa: float = 0.0
    thermostat_tau_fs: float = 100.0
    barostat_tau_fs: float = 200.0
    polar_displacement: float = 0.08  # A, Ti displacement (O opposite, half) of the starting polar structures
    trajectory_stride: int = 20   # MD steps between saved frames (validation frames are drawn from them)
    timeout_s: float = 1800.0     # an MD that takes longer is stopped (its flagged frames are kept)
    excursion_frames: int = 3     # an MD that leaves the trusted range: label the first frame of that excursion
                                  # above the threshold and up to this many in all spread along it
    label_max_displacement: float = 0.5  # A: flagged frames with an atom farther than this from its site are not
                                  # labelled (far outside the expansion's range; they would spoil the fit)


@dataclass
class LoopConfig:
    temperatures: list = field(default_factory=lambda: [15, 50, 100, 150, 200, 250, 300])  # K
    threshold: str = "force_max=0.1"  # QUANTITY=VALUE: force_max (eV/A), energy_mev_per_cell, stress_max_gpa
    threshold_mode: str = "absolute"  # calibrated: VALUE is the real error, the Bayesian one is scaled by the
                                  # median real/Bayesian ratio on the validation frames (refreshed at every fit);
                                  # absolute: VALUE is the Bayesian error; relative: VALUE x the median Bayesian
                                  # error over the training set
    max_labels_per_iteration: int = 24  # cap: the flagged frames with the largest errors are labelled
    max_iterations_per_temperature: int = 6
    validation_per_md: int = 1    # frames per MD labelled for validation only (never trained on)
    holdout_frames: int = 30      # at the end: frames of the last MD at the highest temperature labelled as the
                                  # held-out set of the report (never trained on)
    final_supercell: list = field(default_factory=list)  # e.g. [4, 4, 4]: after the ramp, MD on this larger cell
    final_temperatures: list = field(default_factory=list)  # K, at final_supercell (default: the highest one)


@dataclass
class FitConfig:
    energy_scale: float = 1e-3    # eV/atom; 3e-4 weighs the one energy row of a 40-atom frame against its 120
                                  # force rows better (held-out energy 25 -> 6 meV/cell at 0.01 eV/A more force
                                  # error on a demo's data, docs/otf.md)
    force_scale: float = 0.05     # eV/A
    stress_scale: float = 0.1     # GPa
    bound: bool = True            # check boundedness after each refit, add bounding terms when needed
    bound_temperature: float = 0.0  # K, hot-MD check of boundedness (0: twice the highest loop temperature,
                                    # at least 300 K)
    bound_relax_strain: float = 0.05  # largest strain component of the check's relaxations (and of the floor
                                  # constraints they add); 0.12 catches the uniaxial runaways that NPT MDs of u^4 eta
                                  # fits find at 8-12% strain (docs/fitting.md)
    bound_md_cell: bool = False   # the hot MD of the check moves the cell (catches strain runaways; with sp_pairs
                                  # u^4 eta; see docs/fitting.md)
    bound_md_supercell: list = field(default_factory=lambda: [4, 4, 4])  # the check's hot MD: cell and steps;
    bound_md_steps: int = 300     # a 6x6x6 cell for 1000 steps finds the rare local holes that 10^3 production runs
                                  # meet after picoseconds (docs/fitting.md)
    bound_chains: bool = False    # the check also relaxes (and probes rays) from the polar-chain patterns of the
                                  # metastable phases (P4/nmm, Pmma, Cmcm, Pbcm at 0.2 A), not only from the polar
                                  # R, O, T starts (docs/fitting.md)
    bound_pair_wall: float = 0.0  # eV/A^8: least value of each (u_a - u_b)^8 bounding term (BoundSettings.pair_wall;
                                  # the shipped BaTiO3 model: 1, docs/fitting.md)
    bound_top_positive: bool = False  # the highest pure displacement order's even forms (x^6, x^4 y^2) kept >= 0:
                                  # a top order positive by form (BoundSettings.top_order_positive, docs/fitting.md)


@dataclass
class LabelConfig:
    workers: int = 1              # >1: `mpiexec -n workers sp-server label` (mpi4py) instead of in-process
    mpiexec: str = "mpiexec"
    max_force: float = 50.0       # eV/A: a larger oracle force is a failed label
    max_attempts: int = 3         # failed attempts (errors, bad labels, time-outs, a worker dying) before 'failed'
    lease_s: float = 3600.0
    call_timeout_s: float = 3600.0  # s per oracle call: the oracle runs in a child process, killed (with all it
                                  # launched) past this limit, a failed attempt; 0: in-process, no limit


SECTIONS = {"system": SystemConfig, "harmonic": HarmonicConfig, "terms": TermsConfig, "initial": InitialConfig,
            "md": MDConfig, "loop": LoopConfig, "fit": FitConfig, "label": LabelConfig}


@dataclass
class OtfConfig:
    path: Optional[Path] = None
    run_dir: Path = Path("otf_run")
    oracle: str = "chgnet"
    oracle_options: dict = field(default_factory=dict)
    system: SystemConfig = field(default_factory=SystemConfig)
    harmonic: HarmonicConfig = field(default_factory=HarmonicConfig)
    terms: TermsConfig = field(default_factory=TermsConfig)
    initial: InitialConfig = field(default_factory=InitialConfig)
    md: MDConfig = field(default_factory=MDConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    label: LabelConfig = field(default_factory=LabelConfig)

    @classmethod
    def from_dict(cls, data: dict, path: Optional[Path] = None) -> "OtfConfig":
        data = dict(data)
        where = str(path) if path else "configuration"
        base = Path(path).resolve().parent if path else Path.cwd()
        cfg = cls(path=Path(path).resolve() if path else None)
        run_dir = data.pop("run_dir", "otf_run")
        cfg.run_dir = (base / run_dir).resolve()
        oracle = data.pop("oracle", {"name": "chgnet"})
        if isinstance(oracle, str):
            oracle = {"name": oracle}
        oracle = dict(oracle)
        if "name" not in oracle:
            raise ConfigError(f"{where}: [oracle] needs name = \"chgnet\" | \"sevenn\" | \"abinit\" | ...")
        cfg.oracle = oracle.pop("name")
        cfg.oracle_options = oracle
        for name, table in data.items():
            if name not in SECTIONS:
                raise ConfigError(f"{where}: unknown section [{name}] (known: oracle, {', '.join(SECTIONS)}, "
                                  "run_dir)")
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: [{name}] must be a table")
            known = {f.name: f for f in fields(SECTIONS[name])}
            for key, value in table.items():
                if key not in known:
                    raise ConfigError(f"{where}: unknown key {key!r} in [{name}] (known: {', '.join(known)})")
                section = getattr(cfg, name)
                setattr(section, key, _typed(value, getattr(section, key), f"{where}: [{name}] {key}"))
        if cfg.system.structure != "BaTiO3" and not Path(cfg.system.structure).is_absolute():
            cfg.system.structure = str(base / cfg.system.structure)
        if cfg.harmonic.born and not Path(cfg.harmonic.born).is_absolute():
            cfg.harmonic.born = str(base / cfg.harmonic.born)
        cfg.check(where)
        return cfg

    @classmethod
    def load(cls, path) -> "OtfConfig":
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(data, path)

    def notes(self) -> list:
        """Advice on a valid configuration that will likely give a worse model (logged when a run starts)."""
        out = []
        harm = [int(n) for n in self.harmonic.supercell]
        for name, mesh in (("[md] supercell", self.md.supercell), ("[loop] final_supercell", self.loop.final_supercell)):
            if mesh and any(int(n) > h for n, h in zip(mesh, harm)):
                out.append(f"{name} {list(mesh)} is larger than the harmonic part's [harmonic] supercell {harm}: its "
                           "force constants are Wigner-Seitz interpolated on those cells, which the anharmonic terms "
                           "cannot correct (BaTiO3 with CHGNet, 4x4x4 cells, 0.03 A random displacements: force error "
                           "0.12 eV/A from a 2x2x2 harmonic part, 0.075 from a 4x4x4 one; docs/otf.md)")
        return out

    def check(self, where: str):
        from ..model.posterior import ErrorThreshold
        try:
            ErrorThreshold.parse(self.loop.threshold)
        except ValueError as exc:
            raise ConfigError(f"{where}: [loop] threshold: {exc}") from None
        if self.loop.threshold_mode not in ("calibrated", "absolute", "relative"):
            raise ConfigError(f"{where}: [loop] threshold_mode must be 'calibrated', 'absolute' or 'relative', "
                              f"got {self.loop.threshold_mode!r}")
        temps = [float(t) for t in self.loop.temperatures]
        if not temps or any(t <= 0 for t in temps) or temps != sorted(temps):
            raise ConfigError(f"{where}: [loop] temperatures must be positive and increasing, got {temps}")
        if self.loop.final_temperatures and not self.loop.final_supercell:
            raise ConfigError(f"{where}: [loop] final_temperatures needs final_supercell")
        for name, mesh in (("[md] supercell", self.md.supercell), ("[loop] final_supercell",
                                                                  self.loop.final_supercell or [1, 1, 1]),
                           ("[fit] bound_md_supercell", self.fit.bound_md_supercell)):
            if len(mesh) != 3 or any(int(n) != n or n < 1 for n in mesh):
                raise ConfigError(f"{where}: {name} must be three positive integers, got {mesh}")
        bad = [p for p in self.md.phases if p not in ("R", "O", "T", "C")]
        if bad or not self.md.phases:
            raise ConfigError(f"{where}: [md] phases must be among R, O, T, C; got {self.md.phases}")
        for name in ("steps", "trajectory_stride"):
            if int(getattr(self.md, name)) < 1:
                raise ConfigError(f"{where}: [md] {name} must be >= 1")
        if int(self.fit.bound_md_steps) < 1 or float(self.fit.bound_pair_wall) < 0:
            raise ConfigError(f"{where}: [fit] bound_md_steps must be >= 1 and bound_pair_wall >= 0 (eV/A^8)")
        if self.terms.select_by not in ("evidence", "count"):
            raise ConfigError(f"{where}: [terms] select_by must be 'evidence' or 'count', got {self.terms.select_by!r}")
        pairs = self.terms.sp_pairs
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and v >= 1 for v in p)
                   for p in pairs):
            raise ConfigError(f"{where}: [terms] sp_pairs must be [displacement order, strain power] pairs of positive "
                              f"integers, got {pairs}")
        if int(self.label.workers) < 1:
            raise ConfigError(f"{where}: [label] workers must be >= 1")
