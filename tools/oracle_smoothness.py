"""Is an oracle's energy a smooth Taylor polynomial near the cubic reference?  The second-principles model assumes
it: its harmonic part comes from finite displacements of 0.01 A and the anharmonic terms start at third order.

For each oracle: the cubic cell (lattice relaxed), its harmonic part (phonopy, 2x2x2), its relaxed R3m cell, then
E/lambda^2 along that R3m pattern at the cubic cell (lambda = 1: the relaxed displacements), for the oracle and
for its harmonic part.  A smooth oracle's E/lambda^2 tends to the harmonic value as lambda -> 0 and changes
slowly in lambda^2; one that does not (a plateau, a kink) cannot be fitted by the model to the meV.

    python tools/oracle_smoothness.py [--oracles chgnet sevenn] [--lambdas 0.02 0.05 0.1 0.2 0.3 0.5 0.8]

Units: meV per 5-atom cell.  About 10 s per oracle on 2 cores (CHGNet, SevenNet).
"""
from __future__ import annotations

import argparse

import numpy as np

from sp_server.fit.harmonic import HarmonicSettings, harmonic_from_oracle
from sp_server.oracles import make_oracle
from sp_server.otf.structures import cubic_perovskite
from sp_server.validate.ground_state import double_well, ground_state, model_calculator


def curvature_profile(harm, calc, pattern, lams) -> np.ndarray:
    """E/lambda^2 (meV/cell) of ``calc`` at the cubic cell of ``harm`` displaced by lambda x ``pattern`` ((nat, 3),
    A), for each lambda of ``lams``."""
    lams = np.asarray(lams, dtype=float)
    return np.array(double_well(harm, {"calc": calc}, pattern, lams).energies["calc"]) / lams ** 2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--oracles", nargs="+", default=["chgnet", "sevenn"])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8])
    p.add_argument("--a", type=float, default=4.0, help="A, starting cubic lattice constant (relaxed first)")
    args = p.parse_args(argv)
    lams = np.array(args.lambdas)
    print("E/lambda^2 (meV/cell) at lambda = " + ", ".join(f"{x:g}" for x in lams))
    for name in args.oracles:
        calc = make_oracle(name)
        harm = harmonic_from_oracle(cubic_perovskite(args.a), calc, HarmonicSettings(supercell=(2, 2, 2)),
                                    name=name, log=None)
        gs = ground_state(harm, calc, name, "R")
        pattern = np.array(gs.displacements)
        for label, c in ((name, calc), (f"{name} harmonic part", model_calculator(harm))):
            print(f"{label:24s} " + " ".join(f"{x:8.1f}" for x in curvature_profile(harm, c, pattern, lams)),
                  flush=True)
        print(f"{'':24s} (a0 {np.cbrt(harm.reference.volume):.4f} A; R3m E - E_cubic {gs.energy_mev:.2f} meV/cell, "
              f"largest displacement {np.abs(pattern).max():.3f} A)", flush=True)


if __name__ == "__main__":
    main()
