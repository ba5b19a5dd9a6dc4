"""Building models from data: harmonic part from an oracle, symmetry-adapted candidate terms, Bayesian regression,
term selection and bounding."""
