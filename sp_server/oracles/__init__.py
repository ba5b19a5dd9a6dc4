"""Oracles: whatever labels a structure with energy, forces and stress (an ASE calculator), chosen by name.

``make_oracle(spec)`` understands: ``emt`` (ASE's EMT, for tests), ``chgnet`` and ``sevenn`` (offline DFT
stand-ins, optional packages), and ``package.module:factory`` for any ASE calculator class or factory
(called without arguments).  A missing optional package gives a clear error naming what to install.
"""
from __future__ import annotations

import importlib


class OracleSpecError(ValueError):
    """An oracle specification that cannot be turned into a calculator."""


def _chgnet():
    try:
        from chgnet.model.dynamics import CHGNetCalculator
    except ImportError as exc:
        raise OracleSpecError(f"oracle 'chgnet' needs the chgnet package (pip install chgnet): {exc}") from None
    return CHGNetCalculator()


def _sevenn():
    try:
        from sevenn.calculator import SevenNetCalculator
    except ImportError as exc:
        raise OracleSpecError(f"oracle 'sevenn' needs the sevenn package (pip install sevenn): {exc}") from None
    return SevenNetCalculator("7net-0")


def _emt():
    from ase.calculators.emt import EMT
    return EMT()


BUILTIN = {"emt": _emt, "chgnet": _chgnet, "sevenn": _sevenn}


def make_oracle(spec: str):
    """An ASE calculator from a name (emt, chgnet, sevenn) or an import path 'package.module:factory'."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if ":" not in spec:
        raise OracleSpecError(f"unknown oracle {spec!r}: use one of {sorted(BUILTIN)} or 'package.module:factory'")
    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise OracleSpecError(f"oracle {spec!r}: cannot import {name} from {module} ({exc})") from None
    calc = factory()
    if not hasattr(calc, "get_potential_energy") and not hasattr(calc, "calculate"):
        raise OracleSpecError(f"oracle {spec!r} did not give an ASE calculator (got {type(calc).__name__})")
    return calc
