"""The i-PI protocol force server: driver connections, per-frame Bayesian error, flag queue, hot reload."""
