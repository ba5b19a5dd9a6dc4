"""Figures written to files: matplotlib without a display (Agg) and one way to save a figure."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "save"]


def save(fig, path, dpi: int = 130) -> Path:
    """Lay out, write and close ``fig``; returns the path."""
    from .io.jsonfile import atomic_path
    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:   # never half a PNG, also on a full disk
            fig.savefig(fh, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
