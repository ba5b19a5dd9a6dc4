"""Generation of a pool of symmetry-adapted anharmonic coefficients (the candidates of a fit).

The equivalent of MULTIBINIT's ``fit_generateCoeff`` (``polynomial_coeff_getNorder``): every monomial built from
the *bonds* of the reference (pairs of atoms closer than ``cutoff``, one Cartesian direction per displacement
difference) is summed over its space-group orbit; orbits that cancel are dropped and each orbit is kept once.

Which monomials
---------------
* A displacement monomial is a product of at most ``max_bodies`` distinct differences
  ``(u_c(L) - u_b(L + R))_alpha`` that all share one atom ``c`` (the *centre*, in the home cell): a star of bonds
  around one atom, like MULTIBINIT's terms "around atom i" (``fit_iatom``).  Single-bond terms belong to both ends of
  the bond and are generated once.
* Pure displacement terms have total power in ``orders``; strain-phonon terms are a displacement monomial of total
  power in ``sp_orders`` times a strain monomial (any product of eta_1..eta_6) of total power in ``strain_powers``
  (plus the (displacement order, strain power) pairs of ``sp_pairs``);
  pure strain terms are strain monomials of total power in ``pure_strain``.  ``even_only`` keeps even displacement
  orders only (pure displacement and strain-phonon terms); ``even_top_order`` keeps, at the highest pure
  displacement order, only products of even powers (the only ones a positive coefficient makes bounded).

How (fast)
----------
The space group acts on the star of every atom by signed permutations (tabulated once).  Seeds are restricted by
symmetry: the centre is one atom per Wyckoff orbit and, for several bodies, one of the differences is the
representative of its orbit under the site group of the centre; a seed whose canonical form was already met in an
earlier orbit is skipped.  A strain-phonon orbit is a displacement orbit times an orbit of strain monomials under the
stabiliser of the displacement monomial, so strain never multiplies the number of orbit computations.  Canonical
forms are those of :func:`sp_server.model.symmetry.canonical` (re-implemented here on tuples for speed), so every
coefficient is exactly what :func:`sp_server.model.symmetry.symmetrize` returns for its first term.

Compared with MULTIBINIT
------------------------
MULTIBINIT's ``fit_rangePower`` counts strain factors in the power ((Sr-Ti)^2 eta is power 3) and limits them with
``fit_SPC_maxS``; here displacement and strain orders are separate settings (rangePower 3 4 with SPC_maxS 1 and
fit_anhaStrain 1 is ``orders=(3, 4), sp_orders=(2, 3), strain_powers=(1,), pure_strain=(3, 4)``, with
``max_bodies=4``).  Its ``fit_cutoff`` is in Bohr, ours in Angstrom.  With ``fit_iatom = 0`` it hands every pair to
the first atom that reaches it, so terms around an O made of O-Ba or O-Ti bonds (Ti-O-Ti chains) are never generated;
here every atom is a centre with all its bonds.
"""
from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..model.symmetry import space_group_operations
from ..model.terms import Coefficient, DisplacementDiff, StrainFactor, Term, term_text

__all__ = ["GeneratorSettings", "count_by_order", "generate_terms", "parse_sp_pair", "print_counts"]

_ZERO = (0, 0, 0)
_PAIR = {1: (0, 0), 2: (1, 1), 3: (2, 2), 4: (1, 2), 5: (0, 2), 6: (0, 1)}
_VOIGT = {(0, 0): 1, (1, 1): 2, (2, 2): 3, (1, 2): 4, (2, 1): 4, (0, 2): 5, (2, 0): 5, (0, 1): 6, (1, 0): 6}


@dataclass
class GeneratorSettings:
    """What to generate (see the module docstring).  Lengths in Angstrom."""

    cutoff: float = 2.89            # pairs (atom in home cell, atom in any cell) closer than this form the bonds
    orders: tuple = (3, 4, 5, 6)    # total displacement power of pure-displacement terms
    max_bodies: int = 2             # at most this many distinct displacement differences (bond, direction) per term
    strain_phonon: bool = True      # terms eta^q * (displacement monomial of order n)
    strain_powers: tuple = (1, 2)   # total strain power q of strain-phonon terms
    sp_orders: tuple = (1, 2, 3, 4)  # displacement orders of strain-phonon terms (odd ones often vanish by symmetry)
    pure_strain: tuple = (3, 4)     # orders of pure strain terms (eta monomials)
    sp_pairs: tuple = ()            # more strain-phonon terms: (displacement order n, strain power q) pairs on top of
                                    # sp_orders x strain_powers, e.g. ((3, 1), (4, 1)) for u^3 eta and u^4 eta without
                                    # the many u^3 eta^2, u^4 eta^2 terms
    even_only: bool = False         # keep only even displacement orders
    even_top_order: bool = False    # at the highest pure-displacement order keep only products of even powers
                                    # (x^6, x^4 y^2, x^2 y^2 z^2): an odd-power product there (x^5 y, x^3 y^3)
                                    # is unbounded along some direction whatever its sign

    def check(self):
        if not self.cutoff > 0:
            raise ValueError(f"generator: cutoff must be positive, got {self.cutoff}")
        if int(self.max_bodies) < 1:
            raise ValueError(f"generator: max_bodies must be >= 1, got {self.max_bodies}")
        for name in ("orders", "strain_powers", "sp_orders", "pure_strain"):
            values = tuple(getattr(self, name))
            if any(int(v) != v or v < 1 for v in values):
                raise ValueError(f"generator: {name} must be positive integers, got {values}")
        for pair in self.sp_pairs:
            if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
                raise ValueError(f"generator: sp_pairs must be (displacement order, strain power) pairs of positive "
                                 f"integers, got {tuple(self.sp_pairs)}")


def parse_sp_pair(text: str) -> tuple:
    """'N:Q' (displacement order:strain power, the command-line form of an ``sp_pairs`` entry) -> (N, Q)."""
    try:
        n, q = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"{text!r} is not N:Q (displacement order:strain power, e.g. 4:1)") from None
    return n, q


# --------------------------------------------------------------------------------------------------- canonical forms
def _canonical_disp(factors):
    """Canonical form of a lattice-summed displacement monomial, exactly as symmetry.canonical does it.

    factors: iterable of (atom_a, cell_a, atom_b, cell_b, direction, power) with cells as int tuples.
    Returns (key, sign): key is a sorted tuple of such 6-tuples, sign the factor (+-1) with which the input equals
    the canonical monomial."""
    w = 1
    facs: dict = {}
    for a, ca, b, cb, d, p in factors:
        if (b, cb) < (a, ca):
            a, ca, b, cb = b, cb, a, ca
            if p & 1:
                w = -w
        k = (a, ca, b, cb, d)
        facs[k] = facs.get(k, 0) + p
    if not facs:
        return (), w
    if len(facs) == 1:
        ((a, ca, b, cb, d), p), = facs.items()
        if p == 1:  # a lone linear difference: the lattice sum does not depend on its cells
            return ((a, _ZERO, b, _ZERO, d, 1),), w
    cells = set()
    for a, ca, b, cb, d in facs:
        cells.add(ca)
        cells.add(cb)
    best = None
    items = list(facs.items())
    for c0 in cells:
        x0, y0, z0 = c0
        key = tuple(sorted(
            (a, (ca[0] - x0, ca[1] - y0, ca[2] - z0), b, (cb[0] - x0, cb[1] - y0, cb[2] - z0), d, p)
            for (a, ca, b, cb, d), p in items))
        if best is None or key < best:
            best = key
    return best, w


def _strain_key(strains):
    """Merge and sort (voigt, power) pairs."""
    acc: dict = {}
    for v, q in strains:
        acc[v] = acc.get(v, 0) + q
    return tuple(sorted(acc.items()))


# ------------------------------------------------------------------------------------------------------ the tables
def _signed_image(table, items):
    """Map ((index, power), ...) through table[index] = (new index, +-1); the sign is the product of the signs of
    the odd powers.  Returns (mapped items, sign)."""
    s = 1
    out = []
    for k, p in items:
        k2, sk = table[k]
        if sk < 0 and p & 1:
            s = -s
        out.append((k2, p))
    return out, s


class _Tables:
    """Stars of bonds around every atom and the action of every space-group operation on them."""

    def __init__(self, reference, ops, cutoff):
        self.nat = reference.natoms
        self.nops = len(ops)
        self.stars = _stars(reference, cutoff)  # per atom: list of (b, R) sorted by distance
        self.vars = []     # per atom: list of (b, R, direction)
        self.lookup = []   # per atom: {(b, R, direction): index}
        for c in range(self.nat):
            v = [(b, R, d) for (b, R) in self.stars[c] for d in range(3)]
            self.vars.append(v)
            self.lookup.append({x: i for i, x in enumerate(v)})
        # act[g][c] = (c', [(k', sign) for k in vars[c]])
        self.act = []
        self.strain_act = []  # per op: {voigt: (voigt', sign)}
        for g, op in enumerate(ops):
            rot = [[int(x) for x in row] for row in op.rotation]
            per_atom = []
            for c in range(self.nat):
                c2 = int(op.atom_map[c])
                sc = op.shift[c]
                images = []
                for b, R, d in self.vars[c]:
                    b2 = int(op.atom_map[b])
                    sb = op.shift[b]
                    R2 = tuple(int(rot[i][0] * R[0] + rot[i][1] * R[1] + rot[i][2] * R[2] + sb[i] - sc[i])
                               for i in range(3))
                    k2 = self.lookup[c2].get((b2, R2, op.perm[d]))
                    if k2 is None:
                        raise ValueError(
                            f"symmetry operation {g} maps the bond {c}-{b}{list(R)} onto a pair outside the cutoff: "
                            "the cutoff cuts a shell of symmetry-equivalent neighbours (change it slightly)")
                    images.append((k2, int(op.sign[d])))
                per_atom.append((c2, images))
            self.act.append(per_atom)
            sa = {}
            for v, (i, j) in _PAIR.items():
                sa[v] = (_VOIGT[(op.perm[i], op.perm[j])], int(op.sign[i] * op.sign[j]))
            self.strain_act.append(sa)
        # irreducible atoms (one per orbit) and, for each, representatives of its star variables under the site group
        self.centres = []
        seen = set()
        for c in range(self.nat):
            if c in seen:
                continue
            orbit = {self.act[g][c][0] for g in range(self.nops)}
            seen |= orbit
            self.centres.append(c)
        # seeds of several bodies: (r, k2, rest) with r a representative of its orbit under the site group G_c,
        # k2 a representative under the stabiliser of r in G_c, and every factor of an orbit class >= that of r
        # (any star monomial around c is mapped onto such a seed by an element of G_c)
        self.var_reps = {}     # c -> representatives r (G_c orbits on the star variables)
        self.var_class = {}    # c -> per variable: position of its G_c orbit in var_reps[c]
        self.second_reps = {}  # (c, r) -> representatives of the other variables under Stab_{G_c}(r)
        for c in self.centres:
            site = [g for g in range(self.nops) if self.act[g][c][0] == c]
            nvar = len(self.vars[c])
            reps, cls = [], [None] * nvar
            for k in range(nvar):
                if cls[k] is not None:
                    continue
                for g in site:
                    cls[self.act[g][c][1][k][0]] = len(reps)
                reps.append(k)
            self.var_reps[c] = reps
            self.var_class[c] = cls
            for r in reps:
                stab = [g for g in site if self.act[g][c][1][r][0] == r]
                seconds, done = [], set()
                for k in range(nvar):
                    if k == r or k in done or cls[k] < cls[r]:
                        continue
                    seconds.append(k)
                    done |= {self.act[g][c][1][k][0] for g in stab}
                self.second_reps[(c, r)] = seconds
        self._strain_cache: dict = {}

    def factors(self, c, mono):
        """Star monomial ((k, p), ...) around c -> factor 6-tuples."""
        vs = self.vars[c]
        return [(c, _ZERO, vs[k][0], vs[k][1], vs[k][2], p) for k, p in mono]

    def image(self, g, c, mono):
        """Image of a star monomial under op g: (c', mono', sign)."""
        c2, table = self.act[g][c]
        out, s = _signed_image(table, mono)
        return c2, out, s

    def strain_image(self, g, skey):
        """Image of a canonical strain monomial under op g: (key', sign)."""
        ck = (g, skey)
        hit = self._strain_cache.get(ck)
        if hit is None:
            out, s = _signed_image(self.strain_act[g], skey)
            hit = (_strain_key(out), s)
            self._strain_cache[ck] = hit
        return hit


def _stars(reference, cutoff, tol=1e-6):
    """For every atom c of the home cell, its neighbours (b, R) with 0 < |r_b + R - r_c| < cutoff (+ tol)."""
    cell = reference.cell
    pos = reference.positions
    nat = reference.natoms
    recip = np.linalg.inv(cell).T  # rows: reciprocal vectors (without 2 pi); 1/|b_i| = spacing of lattice planes
    n = [int(np.ceil((cutoff + tol) * np.linalg.norm(recip[i]))) + 1 for i in range(3)]
    cells = np.array(list(itertools.product(*(range(-m, m + 1) for m in n))), dtype=int)
    shifts = cells @ cell
    stars = []
    for c in range(nat):
        found = []
        for b in range(nat):
            dist = np.linalg.norm(pos[b] + shifts - pos[c], axis=1)
            for i in np.flatnonzero((dist < cutoff + tol) & (dist > 1e-8)):
                found.append((round(float(dist[i]), 6), b, tuple(int(x) for x in cells[i])))
        found.sort()
        stars.append([(b, R) for _, b, R in found])
    return stars


def _compositions(n, k):
    """Ordered ways of writing n as a sum of k positive integers."""
    if k == 1:
        yield (n,)
        return
    for first in range(1, n - k + 2):
        for rest in _compositions(n - first, k - 1):
            yield (first,) + rest


def _strain_monomials(q):
    return [_strain_key((v, 1) for v in combo) for combo in itertools.combinations_with_replacement(range(1, 7), q)]


# ------------------------------------------------------------------------------------------------------- generation
@dataclass
class _Orbit:
    order: int
    nbodies: int
    key: tuple          # canonical key of the representative K
    images: list        # per op g: (canonical key of g.K, sign rho_g with g.K = rho_g * key)


def _disp_orbits(tables: _Tables, order: int, max_bodies: int, seen: dict, progress=None) -> list[_Orbit]:
    """All space-group orbits of star monomials of total power ``order`` (vanishing ones included)."""
    orbits = []
    nops = tables.nops
    for c in tables.centres:
        nvar = len(tables.vars[c])
        reps = tables.var_reps[c]
        cls = tables.var_class[c]
        for nb in range(1, min(max_bodies, order) + 1):
            for r in reps:
                if nb == 1:
                    seeds = [(r,)]
                else:
                    allowed = [k for k in range(nvar) if k != r and cls[k] >= cls[r]]
                    seeds = ((r, k2) + rest for k2 in tables.second_reps[(c, r)]
                             for rest in itertools.combinations([k for k in allowed if k != k2], nb - 2))
                for ks in seeds:
                    for powers in _compositions(order, nb):
                        mono = tuple(zip(ks, powers))
                        key0, w0 = _canonical_disp(tables.factors(c, mono))
                        if key0 in seen:
                            continue
                        if any(f[0] == f[2] and f[1] == f[3] for f in key0):
                            # identically zero, e.g. sum_L (u_a(L) - u_a(L + R)) = 0
                            seen[key0] = None
                            continue
                        images = []
                        for g in range(nops):
                            c2, m2, s = tables.image(g, c, mono)
                            kg, wg = _canonical_disp(tables.factors(c2, m2))
                            images.append((kg, s * wg * w0))
                        orbit = _Orbit(order, len(key0), key0, images)
                        for kg, _ in images:
                            seen[kg] = orbit
                        orbits.append(orbit)
        if progress:
            progress(f"order {order}: centre {c}: {len(orbits)} displacement orbits so far")
    return orbits


class _Builder:
    """Turns accumulated {(disp key, strain key): weight} into Coefficients, sharing factor objects."""

    def __init__(self, labels):
        self.labels = labels
        self._disp: dict = {}
        self._strain: dict = {}
        self._score: dict = {}

    def _rank(self, dkey):
        """Preference for the first term: fewest atoms outside the home cell, then smallest cells, then key."""
        r = self._score.get(dkey)
        if r is None:
            nz = sum((ca != _ZERO) + (cb != _ZERO) for _, ca, _, cb, _, _ in dkey)
            size = sum(abs(x) for _, ca, _, cb, _, _ in dkey for x in ca + cb)
            r = self._score[dkey] = (nz, size, dkey)
        return r

    def _d(self, dkey):
        obj = self._disp.get(dkey)
        if obj is None:
            obj = self._disp[dkey] = tuple(DisplacementDiff(*f) for f in dkey)
        return obj

    def _s(self, skey):
        obj = self._strain.get(skey)
        if obj is None:
            obj = self._strain[skey] = tuple(StrainFactor(*f) for f in skey)
        return obj

    def coefficient(self, acc: dict, tol=1e-9) -> Coefficient:
        acc = {k: w for k, w in acc.items() if abs(w) > tol}
        rank = self._rank
        k0 = min(acc, key=lambda k: (rank(k[0]), k[1]))
        w0 = acc[k0]
        d, s = self._d, self._s
        terms = [Term(1.0, d(k0[0]), s(k0[1]))]
        terms += [Term(acc[k] / w0, d(k[0]), s(k[1])) for k in sorted(acc) if k != k0]
        first = terms[0]
        return Coefficient(tuple(terms), name=term_text(first, self.labels))


def generate_terms(reference, settings: GeneratorSettings | None = None, *, ops=None,
                   progress=False) -> list[Coefficient]:
    """Symmetry-adapted coefficients of ``reference`` (a :class:`sp_server.model.Reference`) for ``settings``
    (default ``GeneratorSettings()``).

    Returned in a deterministic order: by displacement order, then strain order, then number of bodies, then
    generation order.  ``ops`` defaults to :func:`space_group_operations` of the reference; ``progress=True`` prints
    progress to stderr."""
    if settings is None:
        settings = GeneratorSettings()
    settings.check()
    t0 = time.perf_counter()

    def say(msg):
        if progress:
            print(f"[generate {time.perf_counter() - t0:7.2f} s] {msg}", file=sys.stderr, flush=True)

    if ops is None:
        ops = space_group_operations(reference)
    tables = _Tables(reference, ops, float(settings.cutoff))
    labels = reference.labels
    say(f"{len(ops)} operations; bonds per atom {[len(s) for s in tables.stars]}; centres "
        f"{[labels[c] for c in tables.centres]}")
    max_bodies = int(settings.max_bodies)
    even = bool(settings.even_only)
    orders = sorted({int(n) for n in settings.orders if not (even and n % 2)})
    sp_pairs: set = set()      # (displacement order, strain power) of the strain-phonon terms
    if settings.strain_phonon:
        sp_pairs = {(int(n), int(q)) for n in settings.sp_orders for q in settings.strain_powers}
        sp_pairs |= {(int(n), int(q)) for n, q in settings.sp_pairs}
        sp_pairs = {(n, q) for n, q in sp_pairs if not (even and n % 2)}
    sp_orders = sorted({n for n, _ in sp_pairs})
    builder = _Builder(labels)
    out = []  # (disp order, strain order, nbodies, index, coefficient)

    top = max(orders) if orders else None

    def add(dorder, sorder, nbodies, acc):
        coef = builder.coefficient(acc)
        if (settings.even_top_order and sorder == 0 and dorder == top
                and any(d.power % 2 for d in coef.terms[0].displacements)):
            return
        out.append((dorder, sorder, nbodies, len(out), coef))

    seen: dict = {}
    orbits_by_order = {}
    for n in sorted(set(orders) | set(sp_orders)):
        orbits_by_order[n] = _disp_orbits(tables, n, max_bodies, seen, say if progress else None)

    # pure displacement terms
    for n in orders:
        for orb in orbits_by_order[n]:
            acc: dict = {}
            for kg, rho in orb.images:
                k = (kg, ())
                acc[k] = acc.get(k, 0) + rho
            if acc[(orb.key, ())] != 0:
                add(n, 0, orb.nbodies, acc)
        say(f"pure displacement order {n}: {len(out)} coefficients so far")

    # strain-phonon terms: displacement orbit x orbits of strain monomials under the stabiliser of the displacement
    strain_monos = {q: _strain_monomials(q) for q in {q for _, q in sp_pairs}}
    for n in sp_orders:
        for orb in orbits_by_order[n]:
            stab = [(g, rho) for g, (kg, rho) in enumerate(orb.images) if kg == orb.key]
            for q in sorted(q for m, q in sp_pairs if m == n):
                done = set()
                for s in strain_monos[q]:
                    if s in done:
                        continue
                    total = 0
                    for g, rho in stab:
                        s2, sg = tables.strain_image(g, s)
                        done.add(s2)
                        if s2 == s:
                            total += rho * sg
                    if total == 0:
                        continue
                    acc = {}
                    for g, (kg, rho) in enumerate(orb.images):
                        s2, sg = tables.strain_image(g, s)
                        k = (kg, s2)
                        acc[k] = acc.get(k, 0) + rho * sg
                    add(n, q, orb.nbodies, acc)
        say(f"strain-phonon displacement order {n}: {len(out)} coefficients so far")

    # pure strain terms
    for q in sorted({int(q) for q in settings.pure_strain}):
        done = set()
        for s in _strain_monomials(q):
            if s in done:
                continue
            acc = {}
            for g in range(tables.nops):
                s2, sg = tables.strain_image(g, s)
                done.add(s2)
                acc[((), s2)] = acc.get(((), s2), 0) + sg
            if acc[((), s)] != 0:
                add(0, q, 0, acc)
    say(f"done: {len(out)} coefficients")
    out.sort(key=lambda x: x[:4])
    return [x[4] for x in out]


# ------------------------------------------------------------------------------------------------------- reporting
def count_by_order(coefficients) -> dict:
    """{(displacement order, strain order): number of coefficients}, sorted by key."""
    counts: dict = {}
    for c in coefficients:
        k = (c.displacement_order, c.strain_order)
        counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items()))


def print_counts(coefficients, file=sys.stdout):
    """Table of the number of coefficients per displacement order (rows) and strain order (columns)."""
    counts = count_by_order(coefficients)
    dorders = sorted({d for d, _ in counts})
    sorders = sorted({s for _, s in counts})
    head = "disp \\ strain" + "".join(f"{s:>8d}" for s in sorders) + f"{'total':>9s}"
    print(head, file=file)
    print("-" * len(head), file=file)
    for d in dorders:
        row = [counts.get((d, s), 0) for s in sorders]
        print(f"{d:>13d}" + "".join(f"{x:>8d}" for x in row) + f"{sum(row):>9d}", file=file)
    print("-" * len(head), file=file)
    cols = [sum(counts.get((d, s), 0) for d in dorders) for s in sorders]
    print(f"{'total':>13s}" + "".join(f"{x:>8d}" for x in cols) + f"{sum(cols):>9d}", file=file)
