"""JSON files written atomically: a reader (or a process killed mid-write) never sees half a file."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path, data, indent: int = 1) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync'ed, then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=indent)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
