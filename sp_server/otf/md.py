"""MD of the on-the-fly loop: several NPT runs with i-PI (one process each) served by one in-process force server.

The server evaluates the current model file (hot reload included), writes every frame's Bayesian errors to
``trace_K.csv`` and the flagged frames (local maxima above the threshold, or untrusted) to a queue database.
An MD whose frame leaves the trusted range (exploding, NaN) is stopped cleanly: the server ends that connection
and its i-PI process is terminated; the other runs go on.  Units: K, fs, GPa in the settings; i-PI gets them
with explicit units in its input.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import ase.io
from ase import Atoms

from ..model.posterior import ErrorThreshold
from ..processes import die_with_parent, stop_process
from ..server.driver import ForceServer, ServeSettings
from ..threads import engine_environment

log = logging.getLogger("sp_server.otf.md")

IPI_INPUT = """<!-- written by sp_server.otf: {what} served by the sp_server force server -->
<simulation verbosity='low' safe_stride='{steps}' floatformat='%24.16e'>
  <output prefix='md'>
    <properties stride='10' filename='out'> [ step, time{{picosecond}}, conserved{{electronvolt}}, temperature{{kelvin}}, potential{{electronvolt}}, volume{{angstrom3}}, pressure_md{{gigapascal}} ] </properties>
    <trajectory filename='pos' stride='{stride}' format='ase'{bead}> positions </trajectory>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>{seed}</seed></prng>
  <ffsocket name='sp' mode='unix' pbc='false'>
    <address>{address}</address>
    <latency>1e-4</latency>
  </ffsocket>
  <system>
    <initialize nbeads='{beads}'>
      <file mode='ase'>init.extxyz</file>
      <velocities mode='thermal' units='kelvin'>{temperature}</velocities>
    </initialize>
    <forces><force forcefield='sp'/></forces>
{ensemble_motion}
  </system>
</simulation>
"""

NPT_BLOCK = """    <ensemble>
      <temperature units='kelvin'>{temperature}</temperature>
      <pressure units='gigapascal'>{pressure}</pressure>
    </ensemble>
    <motion mode='dynamics'>
      <dynamics mode='npt'>
        <timestep units='femtosecond'>{timestep}</timestep>
        <thermostat mode='langevin'><tau units='femtosecond'>{tau_t}</tau></thermostat>
        <barostat mode='flexible'>
          <tau units='femtosecond'>{tau_p}</tau>
          <thermostat mode='langevin'><tau units='femtosecond'>{tau_t}</tau></thermostat>
        </barostat>
      </dynamics>
    </motion>"""

PIMD_NVT_BLOCK = """    <ensemble><temperature units='kelvin'>{temperature}</temperature></ensemble>
    <motion mode='dynamics'>
      <dynamics mode='nvt'>
        <timestep units='femtosecond'>{timestep}</timestep>
        <thermostat mode='pile_l'><tau units='femtosecond'>{tau_t}</tau></thermostat>
      </dynamics>
    </motion>"""


@dataclass
class MDJob:
    name: str            # e.g. "R"
    atoms: Atoms         # starting structure (Angstrom)
    directory: Path      # i-PI runs here
    temperature: float   # K
    steps: int
    seed: int
    beads: int = 1       # > 1: path-integral MD at fixed cell (NVT, PILE-L thermostat); 1: NPT, flexible cell


@dataclass
class MDSettings:
    timestep_fs: float = 1.0
    pressure_gpa: float = 0.0
    thermostat_tau_fs: float = 100.0
    barostat_tau_fs: float = 200.0
    trajectory_stride: int = 20
    timeout_s: float = 1800.0
    excursion_frames: int = 3      # frames labelled from an MD that ended untrusted (ServeSettings)
    error_stride: int = 1          # Bayesian errors every n-th frame (ServeSettings)


@dataclass
class MDOutcome:
    name: str
    status: str          # "done" (i-PI finished), "untrusted" (stopped at an untrusted frame), "error", "timeout"
    frames: int          # frames evaluated
    message: str = ""


def ipi_executable() -> str:
    exe = shutil.which("i-pi") or str(Path(sys.executable).parent / "i-pi")
    if not Path(exe).exists():
        raise FileNotFoundError("i-pi not found: pip install ipi (a dependency of sp_server)")
    return exe


def trajectory_tail(traj, log: Optional[Callable] = None) -> list:
    """The second half of an i-PI trajectory file (its last frame is the trajectory's last); [] when it is
    missing, empty or unreadable (the last with a line to ``log``)."""
    traj = Path(traj)
    if not traj.exists() or traj.stat().st_size == 0:
        return []
    try:
        frames = ase.io.read(traj, index=":")
    except Exception as exc:
        if log is not None:
            log(f"  {traj}: cannot read the trajectory ({exc}); no frame taken from it")
        return []
    return frames[len(frames) // 2:]


def write_ipi_input(job: MDJob, address: str, settings: MDSettings):
    """i-PI's input.xml and init.extxyz in the job's folder: NPT with a flexible cell (one bead), or path-integral
    NVT with ``job.beads`` beads (PILE-L; the trajectory of bead 0)."""
    job.directory.mkdir(parents=True, exist_ok=True)
    ase.io.write(job.directory / "init.extxyz", job.atoms, format="extxyz")
    values = dict(temperature=float(job.temperature), pressure=float(settings.pressure_gpa),
                  timestep=float(settings.timestep_fs), tau_t=float(settings.thermostat_tau_fs),
                  tau_p=float(settings.barostat_tau_fs))
    beads = int(job.beads)
    block = (NPT_BLOCK if beads == 1 else PIMD_NVT_BLOCK).format(**values)
    (job.directory / "input.xml").write_text(IPI_INPUT.format(
        what="NPT (flexible cell)" if beads == 1 else f"path-integral NVT ({beads} beads, PILE-L)",
        steps=int(job.steps), stride=int(settings.trajectory_stride), seed=int(job.seed), address=address,
        temperature=float(job.temperature), beads=beads, bead="" if beads == 1 else " bead='0'",
        ensemble_motion=block))


def continue_ipi_input(restart, directory, address: str, steps: int, stride: Optional[int] = None) -> Path:
    """i-PI's input.xml in ``directory`` that continues the run saved in ``restart`` (an i-PI RESTART or checkpoint
    file: positions of every bead, momenta, cell, thermostat and barostat states, random-number state) for ``steps``
    more MD steps, with its force field on the UNIX socket /tmp/ipi_``address``; ``stride`` (steps) replaces the
    trajectory stride.  Use it to start production from an equilibrated state (i-PI counts steps on from the
    restart's <step>)."""
    import xml.etree.ElementTree as ET
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tree = ET.parse(restart)
    root = tree.getroot()
    step_el = root.find("step")
    done = int(step_el.text) if step_el is not None and step_el.text else 0
    total = root.find("total_steps")
    if total is None:
        raise ValueError(f"{restart}: no <total_steps>: not an i-PI restart file")
    total.text = str(done + int(steps))
    sockets = root.findall("ffsocket")
    if len(sockets) != 1:
        raise ValueError(f"{restart}: {len(sockets)} <ffsocket> elements, expected one")
    sockets[0].set("mode", "unix")
    addr = sockets[0].find("address")
    if addr is None:
        addr = ET.SubElement(sockets[0], "address")
    addr.text = address
    if stride is not None:
        for traj in root.iter("trajectory"):
            traj.set("stride", str(int(stride)))
    path = directory / "input.xml"
    tree.write(path)
    return path


def run_md(model_path, jobs: list[MDJob], queue_url: str, threshold: ErrorThreshold,
           settings: MDSettings = MDSettings(), progress: Optional[Callable] = None) -> list[MDOutcome]:
    """Run the jobs concurrently (one i-PI each, one server); returns one outcome per job.  ``progress(done)`` is
    called with the number of frames evaluated so far (all jobs) about twice a second."""
    tag = uuid.uuid4().hex[:6]
    addresses = [f"spotf{os.getpid() % 100000}{tag}{k}" for k in range(len(jobs))]
    for job, address in zip(jobs, addresses):
        write_ipi_input(job, address, settings)
    trace_dir = jobs[0].directory.parent / "traces"
    if trace_dir.exists():
        shutil.rmtree(trace_dir)
    serve = ServeSettings(threshold=threshold, wait=120.0, stop_untrusted=True, trace_dir=str(trace_dir),
                          excursion_frames=settings.excursion_frames, error_stride=settings.error_stride,
                          socket_timeout=max(120.0, settings.timeout_s))
    server = ForceServer(model_path, addresses, unix=True, connections=1, queue=queue_url, settings=serve)
    ipi = ipi_executable()
    procs = []
    for job in jobs:
        with open(job.directory / "ipi.log", "w") as out:
            procs.append(subprocess.Popen([ipi, "input.xml"], cwd=job.directory, stdout=out,
                                          stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                          env=engine_environment()))
    thread = threading.Thread(target=server.serve_forever, name="otf-server", daemon=True)
    thread.start()
    t0 = time.monotonic()
    status = {}
    try:
        while thread.is_alive():
            thread.join(0.5)
            for k, proc in enumerate(procs):
                if k in status:
                    continue
                outcome = server.outcomes.get(k)
                if outcome is not None and outcome != "exit":
                    status[k] = outcome  # untrusted frame or a broken connection: stop that i-PI
                    stop_process(proc)
                elif proc.poll() is not None and outcome is None and k not in server.connected:
                    status[k] = "error"  # i-PI died before a client connected
                    log.error("MD %s: i-PI exited with %s before the server connected (see %s)", jobs[k].name,
                              proc.returncode, jobs[k].directory / "ipi.log")
            if progress is not None:
                progress(server.frames_total)
            if time.monotonic() - t0 > settings.timeout_s:
                for k, proc in enumerate(procs):
                    if k not in status and server.outcomes.get(k) is None:
                        status[k] = "timeout"
                server.stop.set()
                break
            if len(status) == len(procs) and all(status[k] != "exit" for k in status):
                server.stop.set()
        thread.join(60)
    finally:
        server.stop.set()
        for k, proc in enumerate(procs):
            if k not in status:  # i-PI said EXIT: give it time to write its last files and leave
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    pass
            stop_process(proc)
        for address in addresses:
            Path(f"/tmp/ipi_{address}").unlink(missing_ok=True)
    outcomes = []
    for k, job in enumerate(jobs):
        st = status.get(k) or server.outcomes.get(k) or "error"
        frames = server.frames.get(k, 0)
        message = server.reasons.get(k, "")
        if st == "exit":
            if frames >= job.steps:
                st = "done"
            else:  # the engine went away early: crashed (its log says why)
                st, message = "error", f"i-PI ended after {frames} of {job.steps} steps (see {job.directory}/ipi.log)"
        outcomes.append(MDOutcome(job.name, st, frames, message))
    return outcomes
