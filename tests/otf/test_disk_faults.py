"""Issue 14, item 4: a full or read-only disk.  Every file the loop replaces (state.json, model files, stats.npz) is
written atomically: a write that fails half-way leaves the previous version readable and no temporary file, and
the error names the file; the store is one SQLite transaction; the loop continues after space is freed; the CLI
says so in one line, without a traceback.

Fault mechanisms, real wherever the machine allows them:
  * a small tmpfs (``mount -t tmpfs``, needs root with CAP_SYS_ADMIN) filled up with a filler file: the kernel's
    ENOSPC half-way through the write; ``mount -o remount,ro``: the kernel's EROFS.  Skipped where mount is refused.
  * RLIMIT_FSIZE in a child process (any user, any machine): a write past the limit fails with EFBIG half-way.
  * monkeypatched os.fsync / os.replace raising EDQUOT / ENOSPC: a file system (NFS, quotas) that reports the
    failure only when the data is flushed, or at the rename.
The end-to-end loop test and the CLI test use the tmpfs when they can (the fault is injected by filling the disk
just before the chosen write, so the write itself meets the kernel's ENOSPC) and raise the error themselves
otherwise.
"""
from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sp_server.fit.fit import QuantityScales, TrainingSet
from sp_server.io.jsonfile import write_json
from sp_server.model import AnharmonicPart, Model
from sp_server.model.native import load_model, save_model
from sp_server.model.toy import toy_perovskite
from sp_server.otf.config import OtfConfig
from sp_server.store import Store

from .test_loop import fingerprints, write_config

ROOT = Path(__file__).resolve().parents[2]
FSIZE_LIMIT = 200_000  # bytes: every "version 2" below is larger, every "version 1" smaller


# ------------------------------------------------------------------------------------------------ a small real disk
class Disk:
    """A tmpfs mounted at ``root``: ``fill(leave)`` takes all its free space but ``leave`` bytes (a filler file),
    ``free()`` gives it back, ``read_only()`` / ``writable()`` remount it."""

    def __init__(self, root: Path):
        self.root = root
        self.filler = root / "filler"

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0):
        todo = max(self.free_bytes() - leave, 0)
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            chunk = b"\0" * (1 << 20)
            while todo > 0:
                try:
                    todo -= os.write(fd, chunk[:min(todo, len(chunk))])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        finally:
            os.close(fd)

    def free(self):
        if self.filler.exists():
            self.filler.unlink()

    def _remount(self, mode: str):
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.root)], check=True, capture_output=True)

    def read_only(self):
        self._remount("ro")

    def writable(self):
        self._remount("rw")


def _mount(point: Path, size: str):
    """A tmpfs of ``size`` at ``point`` (a Disk), or None where this process may not mount."""
    point.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return None
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                             capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return Disk(point) if out.returncode == 0 else None


def _umount(disk: Disk):
    subprocess.run(["mount", "-o", "remount,rw", str(disk.root)], capture_output=True)
    disk.free()
    if subprocess.run(["umount", str(disk.root)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(disk.root)], capture_output=True)  # a process still has a file open


@pytest.fixture
def tmpfs(tmp_path):
    """A real 16 MB disk; the test is skipped where mount is not allowed (the RLIMIT_FSIZE and patched variants
    still run there)."""
    disk = _mount(tmp_path / "disk", "16m")
    if disk is None:
        pytest.skip("mount -t tmpfs is not permitted here (no CAP_SYS_ADMIN)")
    try:
        yield disk
    finally:
        _umount(disk)


@pytest.fixture
def maybe_tmpfs(tmp_path):
    """A real 1 GB disk (only what is written takes memory) for the loop, or None where mount is refused: the
    faults are then raised by the injector itself."""
    disk = _mount(tmp_path / "disk", "1g")
    try:
        yield disk
    finally:
        if disk is not None:
            _umount(disk)


# ------------------------------------------------------------------------------------------------ the three writers
def json_versions():
    return {"version": 1, "x": list(range(10))}, {"version": 2, "x": list(range(200_000))}


def model_versions():
    toy = toy_perovskite()
    big = AnharmonicPart(toy.anharmonic.coefficients * 40, np.tile(toy.anharmonic.values, 40))
    return toy, Model(toy.reference, toy.harmonic, big, name="big", version=2)


def training_set():
    toy = toy_perovskite()
    return TrainingSet(toy, toy.anharmonic.coefficients, QuantityScales())


class Writer:
    """One of the loop's file writers: ``write(path, version)``, ``read(path)`` -> the version it holds."""

    name = ""

    def write(self, path, version: int):
        raise NotImplementedError

    def read(self, path) -> int:
        raise NotImplementedError


class JsonWriter(Writer):
    name = "write_json"

    def write(self, path, version):
        write_json(path, json_versions()[version - 1])

    def read(self, path):
        data = json.loads(Path(path).read_text())
        assert data == json_versions()[data["version"] - 1]
        return data["version"]


class ModelWriter(Writer):
    name = "save_model"

    def write(self, path, version):
        save_model(model_versions()[version - 1], path)

    def read(self, path):
        m = load_model(path)
        version = 2 if m.name == "big" else 1
        assert len(m.anharmonic.coefficients) == len(model_versions()[version - 1].anharmonic.coefficients)
        return version


class StatsWriter(Writer):
    name = "TrainingSet.save"

    def write(self, path, version):
        training_set().save(path, ids=np.arange(3 if version == 1 else 300_000), version=np.array(version))

    def read(self, path):
        extra = training_set().load(path)
        version = int(extra["version"])
        assert len(extra["ids"]) == (3 if version == 1 else 300_000)
        return version


WRITERS = {w.name: w for w in (JsonWriter(), ModelWriter(), StatsWriter())}
TARGETS = {"write_json": "state.json", "save_model": "model.h5", "TrainingSet.save": "stats.npz"}


def _leftovers(folder: Path, target: str, *allowed) -> list:
    """Files in ``folder`` other than the target (temporary files left behind, half-written copies)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in (target, *allowed))


def _check_failed_write(exc, path: Path, codes, writer: Writer, folder: Path, *allowed):
    assert exc.errno in codes, exc
    assert exc.filename == str(path), exc          # the target, not a temporary name
    assert str(path) in str(exc)
    assert writer.read(path) == 1                  # the previous version, intact
    assert _leftovers(folder, path.name, *allowed) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("writer", list(WRITERS))
def test_full_tmpfs_midway_keeps_the_previous_version(writer, tmpfs):
    """A real ENOSPC half-way through the new version (all but 16 kB of the disk taken)."""
    w = WRITERS[writer]
    folder = tmpfs.root / "run"
    folder.mkdir()
    path = folder / TARGETS[writer]
    w.write(path, 1)
    tmpfs.fill(leave=16_384)
    with pytest.raises(OSError) as info:
        w.write(path, 2)
    _check_failed_write(info.value, path, {errno.ENOSPC}, w, folder)
    tmpfs.free()                                   # space freed: the same write goes through
    w.write(path, 2)
    assert w.read(path) == 2 and _leftovers(folder, path.name) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("writer", list(WRITERS))
def test_read_only_tmpfs_keeps_the_previous_version(writer, tmpfs):
    """A real EROFS (the disk remounted read-only)."""
    w = WRITERS[writer]
    folder = tmpfs.root / "run"
    folder.mkdir()
    path = folder / TARGETS[writer]
    w.write(path, 1)
    tmpfs.read_only()
    try:
        with pytest.raises(OSError) as info:
            w.write(path, 2)
        _check_failed_write(info.value, path, {errno.EROFS}, w, folder)
    finally:
        tmpfs.writable()
    w.write(path, 2)
    assert w.read(path) == 2


CHILD = """
import json, os, resource, signal, sys
sys.path.insert(0, {root!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)         # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from tests.otf.test_disk_faults import WRITERS
try:
    WRITERS[{writer!r}].write({path!r}, 2)
    print(json.dumps(None))
except OSError as exc:
    print(json.dumps([exc.errno, exc.filename, str(exc)]))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("writer", list(WRITERS))
def test_file_size_limit_midway_keeps_the_previous_version(writer, tmp_path):
    """A real EFBIG half-way (RLIMIT_FSIZE in a child process): works for any user on any machine."""
    w = WRITERS[writer]
    path = tmp_path / TARGETS[writer]
    w.write(path, 1)
    assert path.stat().st_size < FSIZE_LIMIT
    code = CHILD.format(root=str(ROOT), limit=FSIZE_LIMIT, writer=writer, path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result is not None, "the write went through despite the file size limit"
    code_, filename, text = result
    assert code_ == errno.EFBIG and filename == str(path) and str(path) in text
    assert w.read(path) == 1
    assert _leftovers(tmp_path, path.name) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("stage,code", [("fsync", errno.EDQUOT), ("replace", errno.ENOSPC)])
def test_failure_at_flush_or_rename_keeps_the_previous_version(writer, stage, code, tmp_path, monkeypatch):
    """A file system that reports the full disk (or quota) only when the data is flushed (NFS, quotas), or at the
    rename: patched os.fsync / os.replace."""
    w = WRITERS[writer]
    path = tmp_path / TARGETS[writer]
    w.write(path, 1)
    real = getattr(os, stage)

    def failing(*args, **kwargs):
        if stage == "fsync":  # fsync(fd): the kernel's error names no file
            raise OSError(code, os.strerror(code))
        raise OSError(code, os.strerror(code), str(args[0]), None, str(args[1]))  # replace(tmp, target)
    monkeypatch.setattr(os, stage, failing)
    with pytest.raises(OSError) as info:
        w.write(path, 2)
    monkeypatch.setattr(os, stage, real)
    _check_failed_write(info.value, path, {code}, w, tmp_path)
    w.write(path, 2)
    assert w.read(path) == 2 and _leftovers(tmp_path, path.name) == []


@pytest.mark.timeout(60)
def test_a_value_json_cannot_hold_leaves_no_trace(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"version": 1})
    with pytest.raises(TypeError):
        write_json(path, {"version": 2, "bad": object()})
    assert json.loads(path.read_text()) == {"version": 1} and _leftovers(tmp_path, path.name) == []


@pytest.mark.timeout(60)
def test_new_files_get_the_usual_permissions(tmp_path):
    """The temporary files are created like open(path, "w") would (umask applies), not 0600 like mkstemp."""
    old = os.umask(0o022)
    try:
        for name, w in WRITERS.items():
            path = tmp_path / TARGETS[name]
            w.write(path, 1)
            assert path.stat().st_mode & 0o777 == 0o644, name
    finally:
        os.umask(old)


@pytest.mark.timeout(60)
def test_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    """SIGKILL mid-write is the one way to leave a temporary file: the next write of the same target on this host
    removes those of processes that are gone (not those of running ones, other hosts' or other targets')."""
    from sp_server.io.jsonfile import _HOST
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f".state.json.{_HOST}~{gone.pid}.0badc0de.tmp"
    kept = [tmp_path / f".state.json.{_HOST}~{os.getppid()}.0badc0de.tmp",     # a running process
            tmp_path / f".state.json.another-host~{gone.pid}.0badc0de.tmp",    # another host's
            tmp_path / f".model.h5.{_HOST}~{gone.pid}.0badc0de.tmp"]           # another target's
    for p in [dead, *kept]:
        p.write_text("half a file")
    write_json(tmp_path / "state.json", {"version": 1})
    assert not dead.exists() and all(p.exists() for p in kept)


# ------------------------------------------------------------------------------------------------ the loop
FAST = {"temperatures = [30, 120]": "temperatures = [30]",
        "max_iterations_per_temperature = 2": "max_iterations_per_temperature = 1",
        "holdout_frames = 4": "holdout_frames = 2", "steps = 150": "steps = 100",
        "bound_temperature = 300": "bound = false"}


def fast_config(folder: Path, run_dir: Path) -> Path:
    """tests/otf/test_loop.py's teacher-model configuration, cut down to one temperature, one iteration and no
    boundedness checks (about 30 s), with its run folder at ``run_dir``."""
    path = write_config(folder)
    text = path.read_text().replace('run_dir = "run"', f'run_dir = "{run_dir}"')
    for old, new in FAST.items():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


class Injector:
    """Wraps the loop's writers; ``arm(writer, when, leave)`` makes the next call of ``writer`` for which ``when(*args,
    **kwargs)`` holds meet a full disk: on the tmpfs the disk is filled (all but ``leave`` bytes) just before the real
    write, which then fails in the kernel; elsewhere the injector raises what the kernel (or SQLite) would."""

    def __init__(self, monkeypatch, disk):
        import sp_server.otf.loop as loop
        self.disk = disk
        self.armed = None
        self.fired = []
        for owner, attr, name in ((loop, "save_model", "save_model"), (loop, "write_json", "write_json"),
                                  (TrainingSet, "save", "TrainingSet.save"), (Store, "add_many", "Store.add_many")):
            monkeypatch.setattr(owner, attr, self._wrap(name, getattr(owner, attr)))

    def arm(self, name, when, leave=0):
        self.armed = (name, when, leave)

    def _wrap(self, name, real):
        def wrapper(*args, **kwargs):
            if self.armed is not None and self.armed[0] == name and self.armed[1](*args, **kwargs):
                leave = self.armed[2]
                self.armed = None
                self.fired.append(name)
                if self.disk is not None:
                    self.disk.fill(leave)
                elif name == "Store.add_many":   # what the store makes of SQLite's "database or disk is full"
                    raise OSError(errno.ENOSPC, "No space left on device (database or disk is full)",
                                  str(args[0].url))
                else:
                    path = args[1] if name in ("save_model", "TrainingSet.save") else args[0]
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(*args, **kwargs)
        return wrapper


def _check_intact(run: Path):
    """After a failed write: no temporary file anywhere, and every file the loop replaces is whole."""
    stray = [str(p) for p in run.rglob(".*.tmp")] + [str(p) for p in run.rglob("*-journal")]
    assert stray == [], stray
    if (run / "state.json").exists():
        json.loads((run / "state.json").read_text())
    for p in [run / "harmonic.h5", run / "pool.h5", run / "model.h5", *run.glob("models/*.h5")]:
        if p.exists():
            load_model(p)
    if (run / "stats.npz").exists():
        with np.load(run / "stats.npz") as data:
            assert "extra.ids" in data.files


@pytest.mark.timeout(400)
def test_loop_goes_on_after_each_full_disk(tmp_path, monkeypatch, maybe_tmpfs):
    """The loop meets a full disk four times, at four different writes (the store's transaction of the initial set,
    the current model, the training statistics, the state), each time run again after the space is freed: it
    finishes with every iteration and model version once and nothing doubled in the store."""
    from sp_server.otf.loop import OnTheFly
    base = maybe_tmpfs.root if maybe_tmpfs is not None else tmp_path
    run = base / "run"
    cfg = OtfConfig.load(fast_config(tmp_path / "cfg", run))
    inj = Injector(monkeypatch, maybe_tmpfs)
    faults = [
        ("Store.add_many", lambda self, frames, run=None: run == "initial", 0, OSError,
         "database or disk is full", run / "store.db"),
        ("save_model", lambda model, path: Path(path).name == "model.h5", 16_384, OSError, None, run / "model.h5"),
        ("TrainingSet.save", lambda self, path, **extra: True, 1 << 20, OSError, None, run / "stats.npz"),
        ("write_json", lambda path, data, *a, **k: Path(path).name == "state.json" and data.get("stage") == "holdout",
         0, OSError, None, run / "state.json"),
    ]
    for name, when, leave, kind, text, path in faults:
        inj.arm(name, when, leave)
        with pytest.raises(kind) as info:
            OnTheFly(cfg, progress=False, log=lambda m: None).run()
        assert inj.fired[-1] == name, (inj.fired, name)
        if path is not None:
            assert info.value.errno == errno.ENOSPC and info.value.filename == str(path), info.value
        else:
            assert text in str(info.value)
        if maybe_tmpfs is not None:
            maybe_tmpfs.free()
        _check_intact(run)
    assert inj.fired == [f[0] for f in faults]
    OnTheFly(cfg, progress=False, log=lambda m: None).run()
    _check_finished(run)


def _check_finished(run: Path):
    """The fast configuration's run, finished: every iteration and model version once, nothing doubled or left
    pending in the store, the training statistics holding exactly the labelled training frames."""
    _check_intact(run)
    state = json.loads((run / "state.json").read_text())
    assert state["stage"] == "done"
    keys = [h["key"] for h in state["history"]]
    assert keys == ["initial", "T0030.0_it00"]
    assert [h["model_version"] for h in state["history"]] == [1, 2]
    assert sorted(p.name for p in (run / "models").iterdir()) == ["model_v001.h5", "model_v002.h5"]
    assert int(load_model(run / "model.h5").version) == 2
    store = Store(run / "store.db")
    counts = store.counts()
    assert counts["pending"] == 0 and counts["claimed"] == 0 and counts["labeled"] > 0
    fp = fingerprints(store)
    assert len(fp) == len(set(fp)), "a frame is in the store twice"
    runs = {}
    for r in store.rows():
        runs[r.get("run")] = runs.get(r.get("run"), 0) + 1
    assert "initial" in runs and set(runs) <= {"initial", "T0030.0_it00", "holdout"}, runs
    ids = set(int(i) for i in np.load(run / "stats.npz")["extra.ids"])
    assert ids == {r.id for r in store.rows(role="train", state="labeled")}
    assert (run / "report" / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", [pytest.param("summary.json", marks=pytest.mark.long), "state.json"])
def test_full_disk_between_md_frames_and_state(tmp_path, monkeypatch, maybe_tmpfs, where):
    """The MD's record (summary.json) is written before its frames reach the store, the state after: a stop at
    either write (here a full disk) is picked up by the next start, which finishes the run."""
    from sp_server.otf.loop import OnTheFly
    base = maybe_tmpfs.root if maybe_tmpfs is not None else tmp_path
    run = base / "run"
    cfg = OtfConfig.load(fast_config(tmp_path / "cfg", run))
    inj = Injector(monkeypatch, maybe_tmpfs)
    if where == "summary.json":
        inj.arm("write_json", lambda path, data, *a, **k: Path(path).name == "summary.json")
    else:   # the state that would carry the MD's record, after its frames are in the store
        inj.arm("write_json", lambda path, data, *a, **k: Path(path).name == "state.json"
                and isinstance(data, dict) and "pending_record" in data)
    with pytest.raises(OSError):
        OnTheFly(cfg, progress=False, log=lambda m: None).run()
    assert inj.fired == ["write_json"]
    if maybe_tmpfs is not None:
        maybe_tmpfs.free()
    _check_intact(run)
    OnTheFly(cfg, progress=False, log=lambda m: None).run()
    state = json.loads((run / "state.json").read_text())
    assert [h["key"] for h in state["history"]] == ["initial", "T0030.0_it00"]


# ------------------------------------------------------------------------------------------------ the CLI
WRAPPER = '''
"""sp-server with a full disk at one write (the test's fault injection; production code has no hook for it)."""
import errno, os, sqlite3, sys
from pathlib import Path

mode, filler = sys.argv[1], sys.argv[2]


def full_disk(path):
    if filler == "-":  # no tmpfs here: the error the kernel would give
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    st = os.statvfs(os.path.dirname(filler))
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        todo = st.f_bavail * st.f_frsize
        while todo > 0:
            try:
                todo -= os.write(fd, bytes(min(todo, 1 << 20)))
            except OSError:
                break
    finally:
        os.close(fd)


if mode == "harmonic":
    import sp_server.otf.loop as loop
    real_save = loop.save_model

    def save_model(model, path):
        if Path(path).name == "harmonic.h5":
            full_disk(path)
        return real_save(model, path)
    loop.save_model = save_model
elif mode == "store":
    from sp_server.store import Store
    real_add = Store.add_many

    def add_many(self, frames, *, run=None):
        if run == "initial":
            if filler == "-":
                raise sqlite3.OperationalError("database or disk is full")
            full_disk(self.url)
        return real_add(self, frames, run=run)
    Store.add_many = add_many

from sp_server.cli.main import main
sys.exit(main(sys.argv[3:]))
'''

HINT_FULL = "nothing was half-written; free space and run the same command again"


@pytest.mark.timeout(240)
def test_cli_says_which_file_in_one_line(tmp_path, maybe_tmpfs):
    """`sp-server otf CONFIG` on a disk that fills up: exit code 2, one line naming the file, no traceback; the same
    command after the space is freed goes on (and on a read-only disk says so)."""
    base = maybe_tmpfs.root if maybe_tmpfs is not None else tmp_path
    run = base / "run"
    config = fast_config(tmp_path / "cfg", run)
    wrapper = tmp_path / "full_disk_wrapper.py"
    wrapper.write_text(textwrap.dedent(WRAPPER))
    filler = str(maybe_tmpfs.filler) if maybe_tmpfs is not None else "-"

    def sp_server(*args, mode=None):
        cmd = ([sys.executable, str(wrapper), mode, filler] if mode else [sys.executable, "-m", "sp_server.cli.main"])
        out = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=200, cwd=str(ROOT))
        if maybe_tmpfs is not None:
            maybe_tmpfs.free()
        return out

    # 1. the disk is full when the harmonic part is written (after the oracle calls, which are kept)
    out = sp_server("otf", str(config), "--no-progress", mode="harmonic")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"sp-server otf: error: cannot write {run / 'harmonic.h5'}: No space left on device (disk full); {HINT_FULL}"]
    assert not (run / "harmonic.h5").exists()
    _check_intact(run)
    # 2. the same command goes on (the harmonic part from its cached oracle calls) and meets a full disk at the
    #    store's transaction of the initial set: SQLite's error, named by the database file
    out = sp_server("otf", str(config), "--no-progress", mode="store")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"sp-server otf: error: cannot write {run / 'store.db'}: No space left on device (disk full); {HINT_FULL}"]
    assert load_model(run / "harmonic.h5") and load_model(run / "pool.h5")
    assert Store(run / "store.db").rows() == []                 # the transaction was rolled back as a whole
    _check_intact(run)
    if maybe_tmpfs is None:
        return
    # 3. a read-only disk: the first write of the next start fails, with the path and what to do
    maybe_tmpfs.read_only()
    try:
        out = sp_server("otf", str(config), "--no-progress")
    finally:
        maybe_tmpfs.writable()
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sp-server otf: error: cannot write {run}/"), lines
    assert lines[0].endswith("Read-only file system (read-only file system); nothing was half-written; make it "
                             "writable and run the same command again"), lines
    _check_intact(run)


class _Raiser:
    """Stands in for OnTheFly in main(): run() raises the given error from a frame holding ``fh`` / ``store``."""

    error = None
    store = None
    file = None

    def __init__(self, config, progress=True):
        pass

    def run(self):
        if isinstance(_Raiser.error, sqlite3.Error):
            store = _Raiser.store  # noqa: F841 - the CLI finds the database in the frames (SQLite names no file)
            raise _Raiser.error
        with open(_Raiser.file, "a") as fh:  # noqa: F841 - idem, the file of a plain write() without a file name
            raise _Raiser.error


@pytest.mark.timeout(60)
@pytest.mark.parametrize("error,expected", [
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/data/run/state.json"),
     "cannot write /data/run/state.json: Disk quota exceeded (disk quota exceeded); " + HINT_FULL),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/run/model.h5"),
     "cannot write /data/run/model.h5: Permission denied (no permission to write); nothing was half-written; make "
     "it writable and run the same command again"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
     "cannot write {log}: No space left on device (disk full); " + HINT_FULL),
    (RuntimeError("Can't close file (file write failed: time = ..., filename = '/data/x.h5', file descriptor = 3, "
                  "errno = 28, error message = 'No space left on device')"),
     "cannot write /data/x.h5: No space left on device (disk full); " + HINT_FULL),
    (sqlite3.OperationalError("attempt to write a readonly database"),
     "cannot write {db}: attempt to write a readonly database (read-only file system or database file); nothing "
     "was half-written; make it writable and run the same command again"),
    (sqlite3.OperationalError("database or disk is full"),
     "cannot write {db}: database or disk is full (disk full); " + HINT_FULL),
])
def test_cli_message_for_every_kind_of_refused_write(error, expected, tmp_path, monkeypatch, capsys):
    import sp_server.otf.loop as loop
    from sp_server.cli.main import main
    config = write_config(tmp_path)
    _Raiser.error, _Raiser.file = error, tmp_path / "otf.log"
    _Raiser.store = Store(tmp_path / "store.db")
    monkeypatch.setattr(loop, "OnTheFly", _Raiser)
    assert main(["otf", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sp-server otf: error: " + expected.format(log=tmp_path / "otf.log", db=tmp_path / "store.db")]


@pytest.mark.timeout(60)
def test_cli_other_errors_still_raise(tmp_path, monkeypatch):
    import sp_server.otf.loop as loop
    from sp_server.cli.main import main
    config = write_config(tmp_path)
    _Raiser.error, _Raiser.file, _Raiser.store = RuntimeError("boom"), tmp_path / "otf.log", None
    monkeypatch.setattr(loop, "OnTheFly", _Raiser)
    with pytest.raises(RuntimeError, match="boom"):
        main(["otf", str(config), "--no-progress"])
    _Raiser.error = OSError(errno.EIO, os.strerror(errno.EIO), "/data/x")  # not a full / read-only disk
    with pytest.raises(OSError):
        main(["otf", str(config), "--no-progress"])


@pytest.mark.long
@pytest.mark.timeout(300)
def test_cli_disk_too_small_then_enlarged(tmp_path):
    """No injection at all: the run folder on a 250 MB tmpfs, too small for the run (the training statistics take
    ~160 MB, and the previous copy is kept until the new one is complete).  The kernel's ENOSPC wherever it comes:
    one line naming that file, exit code 2, nothing half-written; the disk enlarged (remount size=1g), the same
    command finishes the run."""
    disk = _mount(tmp_path / "disk", "250m")
    if disk is None:
        pytest.skip("mount -t tmpfs is not permitted here (no CAP_SYS_ADMIN)")
    try:
        run = disk.root / "run"
        cmd = [sys.executable, "-m", "sp_server.cli.main", "otf", str(fast_config(tmp_path / "cfg", run)),
               "--no-progress"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=str(ROOT))
        assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and re.fullmatch(
            rf"sp-server otf: error: cannot write {re.escape(str(run))}/\S+: No space left on device \(disk full\); "
            rf"{re.escape(HINT_FULL)}", lines[0]), lines
        _check_intact(run)
        subprocess.run(["mount", "-o", "remount,size=1g", str(disk.root)], check=True, capture_output=True)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=str(ROOT))
        assert out.returncode == 0, out.stderr[-3000:]
        _check_finished(run)
    finally:
        _umount(disk)
