"""Structures of the on-the-fly loop: the cubic reference, frozen-phonon initial training set, polar starting phases.

All built from a model's harmonic part (eV, Angstrom, amu): the frozen phonons are eigenvectors of the
mass-weighted force-constant matrix of the MD supercell (i.e. the phonons at its commensurate q-points), the
polar phases follow the model's lowest zone-centre optical mode.  A configuration (u, eta) becomes a cell
x = (1 + eps(eta)) (R + tau + u), eps symmetric (the model's own strain convention).
"""
from __future__ import annotations

import numpy as np
from ase import Atoms

from ..model.mapping import matrix_from_voigt, voigt_from_matrix
from ..model.model import Model
from ..potential import SupercellPotential

PHASE_DIRECTIONS = {"R": (1, 1, 1), "O": (1, 1, 0), "T": (0, 0, 1), "C": (0, 0, 0)}


def cubic_perovskite(a: float, symbols=("Ba", "Ti", "O")) -> Atoms:
    """ABO3 in Pm-3m: A at the origin, B at the centre, X at the face centres; a in Angstrom."""
    A, B, X = symbols
    return Atoms([A, B, X, X, X], scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                                     (0, 0.5, 0.5)], cell=np.eye(3) * a, pbc=True)


def configuration(model: Model, mesh, u: np.ndarray, eta=np.zeros(6)) -> Atoms:
    """Atoms of the supercell ``mesh`` with displacements u ((n1,n2,n3,nat,3) or (N,3), A) and strain eta."""
    mesh = tuple(int(n) for n in mesh)
    sc = model.supercell(mesh)
    F = np.eye(3) + matrix_from_voigt(np.asarray(eta, dtype=float))
    atoms = sc.copy()
    atoms.set_cell(sc.cell.array @ F.T, scale_atoms=False)
    atoms.positions = (sc.positions + np.asarray(u, dtype=float).reshape(-1, 3)) @ F.T
    return atoms


def _hessian(model: Model, mesh) -> np.ndarray:
    """d2E/du du of the harmonic part on the supercell, (3N, 3N) eV/A^2: the harmonic forces are exactly linear in
    u, so the matrix is read off column by column."""
    mesh = tuple(int(n) for n in mesh)
    pot = SupercellPotential(model, mesh, parts=("short_range", "dipole_dipole"))
    shape = mesh + (model.natoms, 3)
    n3 = int(np.prod(shape))
    eta = np.zeros(6)
    g0 = pot.evaluate(np.zeros(shape), eta).grad_u.reshape(-1)
    hess = np.empty((n3, n3))
    for col in range(n3):
        u = np.zeros(n3)
        u[col] = 1.0
        hess[:, col] = pot.evaluate(u.reshape(shape), eta).grad_u.reshape(-1) - g0
    return 0.5 * (hess + hess.T)


def supercell_modes(model: Model, mesh) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies^2 (eV/A^2/amu; negative = unstable) and displacement patterns (nmodes, N, 3) of the harmonic
    part on the supercell (= the phonons at its commensurate q-points), the three uniform translations removed,
    sorted from the lowest."""
    hess = _hessian(model, mesh)
    ntot = hess.shape[0] // 3
    masses = np.repeat(np.tile(model.reference.masses, ntot // model.natoms), 3)
    w2, vec = np.linalg.eigh(hess / np.sqrt(np.outer(masses, masses)))
    # drop the translations: the eigenvectors with the largest overlap with sqrt(m) e_alpha
    trans = np.zeros((3, 3 * ntot))
    for alpha in range(3):
        trans[alpha, alpha::3] = np.sqrt(masses[alpha::3])
    trans /= np.linalg.norm(trans, axis=1)[:, None]
    overlap = ((trans @ vec) ** 2).sum(axis=0)
    keep = np.sort(np.argsort(-overlap)[3:])
    patterns = (vec[:, keep] / np.sqrt(masses)[:, None]).T.reshape(-1, ntot, 3)
    return w2[keep], patterns


def soft_pattern(model: Model, q=(0.0, 0.0, 0.0), alpha: int = 2) -> np.ndarray:
    """(nat,): per-atom amplitudes of the lowest harmonic mode at the wave vector ``q`` (reduced coordinates; Gamma
    or a zone-boundary point, components 0 or 1/2) polarised along the Cartesian axis ``alpha``: the soft polar mode
    at Gamma, the transverse "chain" modes at X and M of a cubic perovskite.  In a cell L the displacement is
    ``p_i cos(2 pi q.L)`` along alpha.  Every atom of the cubic perovskite sits on a mirror plane normal to alpha,
    and the mirror keeps q and the atoms' cells when q_alpha = 0, so the alpha-polarised modes form their own block
    of the dynamical matrix (summed over a 2x2x2 supercell, dipole-dipole part included); a q with q_alpha = 1/2
    mixes alpha with the other components and is refused.  At Gamma the uniform translation is projected out.
    Normalised to max 1, the atom moving most along +alpha."""
    q = np.asarray(q, dtype=float)
    if not np.allclose(np.round(2 * q), 2 * q):
        raise ValueError(f"soft_pattern: q = {q.tolist()} is not Gamma or a zone-boundary point (components 0, 1/2)")
    if q[alpha] != 0:
        raise ValueError(f"soft_pattern: q = {q.tolist()} has a component along the polarisation axis {alpha}: the "
                         "alpha-polarised modes do not separate there")
    gamma = np.allclose(q, 0)
    mesh = (1, 1, 1) if gamma else (2, 2, 2)
    nat = model.natoms
    hess = _hessian(model, mesh).reshape(-1, nat, 3, len(_cells(mesh)), nat, 3)[0, :, alpha, :, :, alpha]
    phase = np.cos(2 * np.pi * _cells(mesh) @ q)                       # +-1: the dynamical matrix at q is real
    m = model.reference.masses
    block = np.einsum("iLj,L->ij", hess, phase) / np.sqrt(np.outer(m, m))
    block = 0.5 * (block + block.T)
    if gamma:
        t = np.sqrt(m) / np.linalg.norm(np.sqrt(m))
        proj = np.eye(nat) - np.outer(t, t)
        block = proj @ block @ proj + 1e6 * np.outer(t, t)              # translation pushed to the top
    w2, vec = np.linalg.eigh(block)
    p = vec[:, 0] / np.sqrt(m)
    p /= np.abs(p).max()
    return p * np.sign(p[int(np.argmax(np.abs(p)))])


def _cells(mesh) -> np.ndarray:
    """Integer cell coordinates of a supercell in the C order of :meth:`Model.supercell`."""
    return np.array(np.meshgrid(*[np.arange(int(n)) for n in mesh], indexing="ij")).reshape(3, -1).T.astype(float)


def polar_patterns(model: Model) -> np.ndarray:
    """(3, nat): per-atom amplitudes of the lowest zone-centre optical mode polarised along x, y, z (the soft mode
    of a cubic perovskite, :func:`soft_pattern` at Gamma), each normalised to max 1, with one common sign convention
    (the atom that moves most in all three directions, the B cation in a perovskite, moves along +alpha)."""
    out = np.array([soft_pattern(model, (0, 0, 0), alpha) for alpha in range(3)])
    ref = int(np.argmax(np.abs(out).min(axis=0)))
    return out * np.sign(out[:, ref])[:, None]


def polar_structure(model: Model, mesh, phase: str, amplitude: float) -> Atoms:
    """The supercell with the soft-mode pattern along the phase's polar direction (R 111, O 110, T 001, C none);
    ``amplitude``: largest atomic displacement, A."""
    d = np.asarray(PHASE_DIRECTIONS[phase], dtype=float)
    if np.linalg.norm(d) > 0:
        d = d / np.linalg.norm(d)
    u_cell = polar_patterns(model).T * d[None, :]
    if np.abs(u_cell).max() > 0:
        u_cell *= amplitude / np.linalg.norm(u_cell, axis=1).max()
    u = np.broadcast_to(u_cell, tuple(int(n) for n in mesh) + u_cell.shape)
    return configuration(model, mesh, u)


X_POINT, Y_POINT, M_POINT, GAMMA = (0.5, 0.0, 0.0), (0.0, 0.5, 0.0), (0.5, 0.5, 0.0), (0.0, 0.0, 0.0)
# the local minima of the polar chain instability of a cubic perovskite (the paper's Table 2): name ->
# (smallest supercell, [(q, direction d of the soft mode at q)]); spglib finds these space groups (tested)
PHASES = {
    "P4/nmm": ((2, 2, 1), [(M_POINT, (0, 0, 1))]),
    "Pmma": ((2, 1, 1), [(X_POINT, (0, 0, 1))]),
    "Cmcm": ((2, 1, 1), [(X_POINT, (0, 1, 1))]),
    "P4mm": ((1, 1, 1), [(GAMMA, (0, 0, 1))]),
    "Amm2": ((1, 1, 1), [(GAMMA, (1, 1, 0))]),
    "R3m": ((1, 1, 1), [(GAMMA, (1, 1, 1))]),
    "Pbcm": ((2, 2, 1), [(X_POINT, (0, 1, 0)), (Y_POINT, (0, 0, 1))]),
}


def phase_structure(model: Model, name: str, amplitude: float = 0.1) -> Atoms:
    """The reference supercell of the phase ``name`` (a key of :data:`PHASES`) with its pattern: every component
    ``p_i cos(2 pi q.L)`` along d with largest atomic displacement ``amplitude`` (A)."""
    u = phase_displacements(model, name, amplitude)
    return configuration(model, PHASES[name][0], u)


def phase_displacements(model: Model, name: str, amplitude: float, mesh=None) -> np.ndarray:
    """(n_cells, nat, 3) A: the pattern of the phase ``name`` (see :func:`phase_structure`) on the supercell
    ``mesh`` (None: the phase's own), which must be a multiple of the phase's own (e.g. 2x2x2 for all of
    :data:`PHASES`)."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}: choose among {list(PHASES)}")
    own, comps = PHASES[name]
    mesh = own if mesh is None else mesh
    if any(int(n) % m for n, m in zip(mesh, own)):
        raise ValueError(f"phase {name}: supercell {tuple(mesh)} is not a multiple of its own {own}")
    cells = _cells(mesh)
    u = np.zeros((len(cells), model.natoms, 3))
    for q, d in comps:
        d = np.asarray(d, dtype=float) / np.linalg.norm(d)
        wave = np.cos(2 * np.pi * cells @ np.asarray(q))
        part = np.zeros((model.natoms, 3))
        for alpha in range(3):
            if d[alpha]:
                part[:, alpha] = d[alpha] * soft_pattern(model, q, alpha)
        part *= amplitude / np.linalg.norm(part, axis=1).max()
        u += wave[:, None, None] * part[None]
    return u


def polar_backgrounds(model: Model, mesh=(2, 2, 2), phases=("R", "O", "T"), amplitudes=(0.1, 0.2)) -> list:
    """[(name, u (mesh + (nat, 3)) A)] of the polar structures the MDs start from and pass through, for the
    boundedness probes (sp_server.fit.probes.ProbeSettings.backgrounds)."""
    ref = model.supercell(mesh).positions
    out = []
    for phase in phases:
        for amp in amplitudes:
            u = polar_structure(model, mesh, phase, amp).positions - ref
            out.append((f"{phase} polar {amp:g} A", u.reshape(tuple(mesh) + (model.natoms, 3))))
    return out


def chain_backgrounds(model: Model, amplitudes=(0.2,), names=("P4/nmm", "Pmma", "Cmcm", "Pbcm")) -> list:
    """[(name, u (2, 2, 2, nat, 3) A)] of the polar-chain patterns of the metastable phases (:data:`PHASES`; the
    uniform ones, P4mm, Amm2 and R3m, are :func:`polar_backgrounds` already), for the boundedness check's
    relaxations: a fit may hold from the polar starts and still fall from a chain pattern (a P4/nmm relaxation of
    a rebuilt BaTiO3 model ran to 25% strain, issue 15)."""
    mesh = (2, 2, 2)
    return [(f"{name} chains {amp:g} A", phase_displacements(model, name, amp, mesh).reshape(mesh + (model.natoms, 3)))
            for name in names for amp in amplitudes]


def polar_strain(direction, s: float, kind: str) -> np.ndarray:
    """Voigt strain (engineering shear) that keeps the symmetry of a polar phase along ``direction``: "uniaxial"
    s d d^T (the tetragonal c/a, the rhombohedral shear), "volume" s/3 times the identity; both change the volume by
    the same fraction s (to first order)."""
    d = np.asarray(direction, dtype=float)
    d = d / np.linalg.norm(d)
    if kind not in ("uniaxial", "volume"):
        raise ValueError(f"polar_strain: kind must be 'uniaxial' or 'volume', got {kind!r}")
    return voigt_from_matrix(s * np.outer(d, d) if kind == "uniaxial" else s / 3.0 * np.eye(3))


def initial_structures(model: Model, mesh, amplitudes, modes: int, strains, mixed: int, seed: int = 0,
                       polar_amplitudes=(), rattled: int = 0, rattle_amplitudes=(0.04, 0.08, 0.12),
                       polar_strains=(), polar_strain_amplitudes=(), chain_amplitudes=()) -> list:
    """The phonon-derived initial training set: [(Atoms, meta)].

    - frozen phonons: the ``modes`` lowest supercell modes (unstable ones first; in practice the soft polar and
      the zone-boundary rotation/antipolar modes) at each amplitude (largest displacement, A);
    - homogeneous strains of the unit cell: +-s on each Voigt component for each magnitude s;
    - ``mixed`` random combinations of the low modes (random weights, largest displacement up to the largest
      amplitude) with a random strain up to the largest magnitude, on the supercell;
    - the soft zone-centre mode along 111, 110 and 001 (the R, O and T wells: combinations of the degenerate
      unstable modes that no single mode reaches) on the unit cell, at each of ``polar_amplitudes`` (A);
    - the same polar cells at each of ``polar_strain_amplitudes`` (A), strained along their own symmetry
      (:func:`polar_strain`, uniaxial along the polar axis and volume) by each of ``polar_strains``: the
      spontaneous strain of the polar phases, which only the strain-polar couplings (u^2 eta, u^4 eta) carry,
      and the wall where the oracle's flat valley along the polar axis ends (CHGNet: c/a 1.07).  Without frames
      beyond it, u^4 eta fits let 2x2x2 NPT MDs at 15-100 K run along the valley to c/a 1.2 and fall by 1-1.5 eV
      per cell where the oracle climbs;
    - the polar-chain patterns of :data:`PHASES` (the soft modes at X, M and Gamma of the paper's Table 2: antipolar
      chains, their combinations, and the uniform polar phases) on their smallest supercells, at each of
      ``chain_amplitudes`` (largest displacement, A).  A 2x2x2 MD from the polar wells hardly visits these
      patterns; the shipped model, trained without them, puts P4/nmm 28 meV/cell too low;
    - ``rattled`` supercells with every atom displaced at random (Gaussian, RMS per atom cycling through
      ``rattle_amplitudes``, A) and a random strain, a quarter each on the cubic, R, O and T polar structure (the
      largest polar amplitude): the local, uncorrelated distortions of thermal MD, which no collective mode
      contains.  Without them a fit of collective modes alone had forces of 20-80 eV/A at 0.1 A of random
      displacement (harmonic part: 3 eV/A) and every hot MD blew up within 12 fs."""
    rng = np.random.default_rng(seed)
    out = []
    w2, patterns = supercell_modes(model, mesh)
    low = patterns[:modes]
    for m, p in enumerate(low):
        p = p / np.abs(p).max()
        for amp in amplitudes:
            out.append((configuration(model, mesh, amp * p), {"origin": "phonon", "mode": m,
                                                             "omega2": float(w2[m]), "amplitude": float(amp)}))
    for s in strains:
        for v in range(6):
            for sign in (1, -1):
                eta = np.zeros(6)
                eta[v] = sign * s
                out.append((configuration(model, (1, 1, 1), np.zeros((model.natoms, 3)), eta),
                            {"origin": "strain", "voigt": v, "strain": float(sign * s)}))
    for phase in ("R", "O", "T"):
        for amp in polar_amplitudes:
            out.append((polar_structure(model, (1, 1, 1), phase, amp), {"origin": "polar", "phase": phase,
                                                                         "amplitude": float(amp)}))
    for phase in ("R", "O", "T"):
        for amp in polar_strain_amplitudes:
            u = polar_structure(model, (1, 1, 1), phase, amp).positions - model.supercell((1, 1, 1)).positions
            for kind in ("uniaxial", "volume"):
                for s in polar_strains:
                    eta = polar_strain(PHASE_DIRECTIONS[phase], s, kind)
                    out.append((configuration(model, (1, 1, 1), u, eta),
                                {"origin": "polar strain", "phase": phase, "amplitude": float(amp), "kind": kind,
                                 "strain": float(s)}))
    for name in PHASES:
        for amp in chain_amplitudes:
            out.append((phase_structure(model, name, amp), {"origin": "chain", "phase": name,
                                                            "amplitude": float(amp)}))
    amax = max(amplitudes) if len(amplitudes) else 0.1
    smax = max(strains) if len(strains) else 0.01
    for k in range(mixed):
        weights = rng.normal(size=len(low))
        u = np.tensordot(weights, low, axes=1)
        u *= rng.uniform(0.3, 1.0) * amax / np.abs(u).max()
        eta = rng.uniform(-smax, smax, size=6)
        out.append((configuration(model, mesh, u, eta), {"origin": "mixed", "index": k}))
    pmax = max(polar_amplitudes) if len(polar_amplitudes) else 0.0
    for k in range(rattled):
        phase = ("C", "R", "O", "T")[k % 4]
        amp = float(rattle_amplitudes[(k // 4) % len(rattle_amplitudes)])
        base = polar_structure(model, mesh, phase, pmax) if phase != "C" and pmax > 0 else model.supercell(mesh)
        u = base.positions - model.supercell(mesh).positions
        u = u + rng.normal(0.0, amp / np.sqrt(3.0), u.shape)
        eta = rng.uniform(-0.5 * smax, 0.5 * smax, size=6)
        out.append((configuration(model, mesh, u, eta), {"origin": "rattled", "index": k, "phase": phase,
                                                         "amplitude": amp}))
    return out
