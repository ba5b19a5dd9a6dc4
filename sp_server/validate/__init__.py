"""Validation of a model against its oracle: the paper's tables and figures, side by side (issue 8)."""
