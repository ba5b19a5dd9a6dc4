"""Oracles: whatever labels a structure with energy, forces and stress (an ASE calculator), chosen by name.

``make_oracle(spec, options)`` understands: ``emt`` (ASE's EMT, for tests), ``model`` (a second-principles
model file as the oracle, option ``path``: teacher-student tests), ``chgnet`` and ``sevenn`` (offline
DFT stand-ins, optional packages), ``abinit`` (ABINIT through ASE, launched with MPI; :mod:`.abinit`), ``socket``
(any i-PI protocol client: LAMMPS fix ipi, CP2K, pw.x --ipi; :mod:`.socket`), ``faulty`` (another oracle with
faults injected on purpose, :mod:`.faults`) and ``package.module:factory`` for any ASE calculator class or factory
(called with the options as keyword arguments).  :func:`isolated_oracle` runs any of them in a child process with a
time limit per call (:mod:`.isolated`).  A missing optional
package gives a clear error naming what to install.
"""
from __future__ import annotations

import importlib


class OracleSpecError(ValueError):
    """An oracle specification that cannot be turned into a calculator."""


INSTALL_TORCH = "pip install 'torch==2.13.0+cpu' first (a bare torch pulls a CUDA build), then "


def _chgnet(**options):
    try:
        from chgnet.model.dynamics import CHGNetCalculator
    except ImportError as exc:
        raise OracleSpecError(f"oracle 'chgnet' needs the chgnet package ({INSTALL_TORCH}pip install chgnet, "
                              f"or pip install 'sp_server[oracles]'): {exc}") from None
    options.setdefault("use_device", "cpu")
    return CHGNetCalculator(**options)


def _sevenn(**options):
    try:
        from sevenn.calculator import SevenNetCalculator
    except ImportError as exc:
        raise OracleSpecError(f"oracle 'sevenn' needs the sevenn package ({INSTALL_TORCH}pip install sevenn): "
                              f"{exc}") from None
    options.setdefault("model", "7net-0")
    options.setdefault("device", "cpu")
    return SevenNetCalculator(**options)


def _emt(**options):
    from ase.calculators.emt import EMT
    return EMT(**options)


def _abinit(**options):
    from .abinit import make_abinit
    return make_abinit(**options)


def _socket(**options):
    from .socket import make_socket_oracle
    return make_socket_oracle(**options)


def _faulty(**options):
    from .faults import FaultyOracle
    return FaultyOracle(**options)


def _model(path: str, **options):
    from ..calculator import SecondPrinciplesCalculator
    from ..model.native import load_model
    return SecondPrinciplesCalculator(load_model(path), **options)


BUILTIN = {"emt": _emt, "model": _model, "chgnet": _chgnet, "sevenn": _sevenn, "abinit": _abinit, "socket": _socket,
           "faulty": _faulty}


def make_oracle(spec: str, options: dict | None = None):
    """An ASE calculator from a name (emt, chgnet, sevenn, abinit, socket) or an import path
    'package.module:factory'; ``options`` (e.g. a TOML table) are passed to the factory as keyword arguments."""
    options = dict(options or {})
    if spec in BUILTIN:
        try:
            return BUILTIN[spec](**options)
        except TypeError as exc:
            raise OracleSpecError(f"oracle {spec!r}: bad options {sorted(options)}: {exc}") from None
    if ":" not in spec:
        raise OracleSpecError(f"unknown oracle {spec!r}: use one of {sorted(BUILTIN)} or 'package.module:factory'")
    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise OracleSpecError(f"oracle {spec!r}: cannot import {name} from {module} ({exc})") from None
    calc = factory(**options)
    if not hasattr(calc, "get_potential_energy") and not hasattr(calc, "calculate"):
        raise OracleSpecError(f"oracle {spec!r} did not give an ASE calculator (got {type(calc).__name__})")
    return calc


def isolated_oracle(spec: str, options: dict | None = None, timeout_s: float | None = 3600.0):
    """``make_oracle(spec, options)`` in a child process, each call limited to ``timeout_s`` seconds (a hang kills
    the oracle's processes and is a failed call; a crash too).  ``timeout_s`` None or <= 0: in this process, no
    limit."""
    if not timeout_s or timeout_s <= 0:
        return make_oracle(spec, options)
    from .isolated import IsolatedOracle
    return IsolatedOracle(spec, options, timeout_s)
