"""Figures written to files: matplotlib without a display (Agg) and one way to save a figure."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "save"]


def save(fig, path, dpi: int = 130) -> Path:
    """Lay out, write and close ``fig``; returns the path."""
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
