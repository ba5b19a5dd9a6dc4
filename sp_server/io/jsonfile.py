"""Files replaced atomically: a reader (or a process killed mid-write, or a disk that fills up or turns read-only
mid-write) never sees half a file, and a failed write leaves the previous version in place and no temporary file.

:func:`atomic_path` is the one way sp_server replaces a file (JSON here, models in sp_server.model.native, training
statistics in sp_server.fit.fit): the new content goes to a temporary file in the same folder (same file system,
so the rename is atomic), which is flushed to the disk (``fsync``: a full disk or quota is reported here and not
at some later write-back, when the old file is already gone), then renamed over the target (``os.replace``), and
the folder is synced so that the rename itself survives a crash.  Any error on the way removes the temporary file
and is raised as an ``OSError`` whose ``filename`` is the target (not the temporary name) and whose ``errno`` is
the system's (ENOSPC, EDQUOT, EROFS, EACCES, ...), also when the library that wrote the file (HDF5) hid it in a
message.  Temporary files are named ``.TARGET.HOST~PID.RANDOM.tmp`` (hidden, and not matched by ``*.h5``-style
patterns); one left by a process killed mid-write (SIGKILL) is removed by the next write of the same target on that
host.
"""
from __future__ import annotations

import contextlib
import errno as _errno
import json
import os
import re
import secrets
import socket
from pathlib import Path

from ..processes import process_alive

#: errno values that mean "this disk cannot take the file now": full, over quota, read-only, not writable, too big
DISK_ERRNOS = frozenset(e for e in (_errno.ENOSPC, getattr(_errno, "EDQUOT", None), _errno.EROFS, _errno.EACCES,
                                    _errno.EFBIG) if e is not None)

_ERRNO_IN_TEXT = re.compile(r"errno\s*=\s*(\d+)")
#: temporary files are named .TARGET.HOST~PID.RANDOM.tmp: those of a process of this host that is gone are removed
_HOST = socket.gethostname().replace("/", "_").replace("~", "_") or "localhost"


def error_errno(exc: BaseException):
    """The system errno behind ``exc``: ``OSError.errno``, or the ``errno = N`` HDF5 writes into its messages (h5py
    raises them as OSError without errno or as RuntimeError); None when there is none."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code is None and isinstance(exc, (OSError, RuntimeError)):
        m = _ERRNO_IN_TEXT.search(str(exc))
        if m:
            code = int(m.group(1))
    return code


def _naming(exc: BaseException, path: Path, tmp=None):
    """``exc`` as an OSError(errno, strerror, path) naming the target file, or None to re-raise ``exc`` as it is
    (no errno, or an OSError about some other file than the target and its temporary file)."""
    code = error_errno(exc)
    if code is None:
        return None
    names = {str(n) for n in (getattr(exc, "filename", None), getattr(exc, "filename2", None)) if n is not None}
    if names - {str(path), str(tmp)}:
        return None
    return OSError(code, os.strerror(code), str(path))  # the matching subclass (PermissionError, ...)


def _fsync_path(path, directory: bool = False):
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """``with atomic_path(target) as tmp: write(tmp)``: on success ``tmp`` (a new, empty file in the target's folder,
    with the permissions a plain ``open(target, "w")`` would give) is synced and renamed over ``target``; on any
    error it is removed and the previous ``target`` (if any) is left untouched.  OSErrors (and HDF5 errors carrying
    an errno) are re-raised as ``OSError(errno, strerror, target)`` chained to the original."""
    path = Path(path)
    try:
        while True:
            tmp = path.with_name(f".{path.name}.{_HOST}~{os.getpid()}.{secrets.token_hex(4)}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
                break
            except FileExistsError:
                continue
        os.close(fd)
    except OSError as exc:
        raise (_naming(exc, path, tmp) or exc) from exc
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        new = _naming(exc, path, tmp) if isinstance(exc, (OSError, RuntimeError)) else None
        if new is None:
            raise
        raise new from exc
    try:
        _fsync_path(path.parent, directory=True)  # the rename itself, on the disk
    except OSError:
        pass  # the new file is in place; a folder that cannot be synced (some network file systems) is no error
    _remove_stale(path)


def _remove_stale(path: Path):
    """Temporary files of ``path`` left by processes of this host that no longer exist (killed with SIGKILL
    mid-write: nothing else can stop a write without removing its temporary file)."""
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        host, _, pid = name[len(prefix):-len(".tmp")].rpartition(".")[0].rpartition("~")
        if host != _HOST or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if process_alive(int(pid)):
            continue  # still writing
        with contextlib.suppress(OSError):
            os.unlink(path.parent / name)


def write_bytes(path, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically (see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def write_json(path, data, indent: int = 1) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync'ed, then renamed (see
    :func:`atomic_path`; a full or read-only disk leaves the previous file and raises an OSError naming ``path``).
    ``data`` is serialised before anything is written, so a value JSON cannot hold leaves no trace either."""
    return write_bytes(path, json.dumps(data, indent=indent).encode())
