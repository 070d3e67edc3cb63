"""Experiment configuration: TOML in, validated frozen dataclasses out.

Schema (every key optional unless marked *required*; defaults in :data:`SCHEMA`)::

    [mdp]     model*, gamma*, tau*, params = {...}
    [states]  lower, upper, n                       (omit for one-state models such as "bandit")
    [actions] lower*, upper*, cells, reference = "lebesgue" | "gaussian", reference_std
    [flow]    kind = "wasserstein", scheme = "sg" | "sqra", dt, t_end, adaptive, adapt_tol, dt_max,
              gap_tol, init = "uniform" | "gaussian", init_mean, init_std
    [output]  snapshots

Config strings are data: a model name is looked up in a registry or imported as
``package.module:function`` by :mod:`solver.models`; nothing is ever passed to ``eval``/``exec``.
Every error is a :class:`ConfigError` whose message names the key and what is allowed.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """Bad user input. The message is one line: ``<key>: <what is wrong and what is allowed>``."""


@dataclass(frozen=True)
class Key:
    """One schema entry: type, default (``REQUIRED`` if none) and a check returning an error or None."""

    kind: type | tuple[type, ...]
    default: Any
    check: Callable[[Any], str | None] | None = None


REQUIRED = object()


def _finite(x):
    return None if math.isfinite(x) else "must be a finite number"


def _positive(x):
    return None if math.isfinite(x) and x > 0 else "must be a finite number > 0"


def _at_least_one(x):
    return None if x >= 1 else "must be an integer >= 1"


def _at_least_two(x):
    return None if x >= 2 else "must be an integer >= 2"


def _one_of(*allowed):
    def check(x):
        return None if x in allowed else f"must be one of {', '.join(repr(a) for a in allowed)}"
    return check


def _discount(x):
    return None if 0 <= x < 1 else "must be in [0, 1)"


FLOW_KINDS = ("wasserstein",)

SCHEMA: dict[str, dict[str, Key]] = {
    "mdp": {
        "model": Key(str, REQUIRED),
        "gamma": Key(float, REQUIRED, _discount),
        "tau": Key(float, REQUIRED, _positive),
        "params": Key(dict, {}),
    },
    "states": {
        "lower": Key(float, -1.0, _finite),
        "upper": Key(float, 1.0, _finite),
        "n": Key(int, 1, _at_least_one),
    },
    "actions": {
        "lower": Key(float, REQUIRED, _finite),
        "upper": Key(float, REQUIRED, _finite),
        "cells": Key(int, 256, _at_least_two),
        "reference": Key(str, "lebesgue", _one_of("lebesgue", "gaussian")),
        "reference_std": Key(float, 1.0, _positive),
    },
    "flow": {
        "kind": Key(str, "wasserstein", _one_of(*FLOW_KINDS)),
        "scheme": Key(str, "sg", _one_of("sg", "sqra")),
        "dt": Key(float, 0.01, _positive),
        "t_end": Key(float, 10.0, _positive),
        "adaptive": Key(bool, False),
        "adapt_tol": Key(float, 1e-3, _positive),
        "dt_max": Key(float, math.inf, lambda x: None if x > 0 else "must be > 0"),
        "gap_tol": Key(float, 1e-10, lambda x: None if x >= 0 else "must be >= 0"),
        "init": Key(str, "uniform", _one_of("uniform", "gaussian")),
        "init_mean": Key(float, 0.0, _finite),
        "init_std": Key(float, 1.0, _positive),
    },
    "output": {
        "snapshots": Key(int, 20, _at_least_two),
    },
}


@dataclass(frozen=True)
class MDPConfig:
    model: str
    gamma: float
    tau: float
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StatesConfig:
    lower: float
    upper: float
    n: int


@dataclass(frozen=True)
class ActionsConfig:
    lower: float
    upper: float
    cells: int
    reference: str
    reference_std: float


@dataclass(frozen=True)
class FlowConfig:
    kind: str
    scheme: str
    dt: float
    t_end: float
    adaptive: bool
    adapt_tol: float
    dt_max: float
    gap_tol: float
    init: str
    init_mean: float
    init_std: float


@dataclass(frozen=True)
class OutputConfig:
    snapshots: int


@dataclass(frozen=True)
class Config:
    """A validated experiment. ``states`` is None when the config has no ``[states]`` table."""

    mdp: MDPConfig
    states: StatesConfig | None
    actions: ActionsConfig
    flow: FlowConfig
    output: OutputConfig

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["states"] is None:
            del d["states"]
        return d


_SECTIONS = {"mdp": MDPConfig, "states": StatesConfig, "actions": ActionsConfig, "flow": FlowConfig,
             "output": OutputConfig}
_OPTIONAL_SECTIONS = ("states", "flow", "output")


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a TOML file, apply ``key=value`` overrides (see :func:`apply_override`) and validate."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def apply_override(raw: dict, item: str) -> None:
    """Apply ``--set a.b.c=value`` to a raw config dict in place.

    The value is parsed as a TOML value (``1e-3``, ``true``, ``"x"``, ``[1, 2]``); anything that is not
    valid TOML is taken as a plain string, so ``--set mdp.model=lqr`` works without quotes.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key such as mdp.tau=0.5")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    *parents, last = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parents[:depth + 1])} is not a table")
    node[last] = value


def from_dict(raw: dict) -> Config:
    """Validate a raw (parsed TOML) dict against :data:`SCHEMA`."""
    unknown = sorted(set(raw) - set(SCHEMA))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (allowed: {', '.join(SCHEMA)})")
    sections = {}
    for name, keys in SCHEMA.items():
        table = raw.get(name)
        if table is None and name in _OPTIONAL_SECTIONS:
            sections[name] = None if name == "states" else _section(name, keys, {})
            continue
        if table is None:
            raise ConfigError(f"{name}: missing required section [{name}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: must be a table [{name}]")
        sections[name] = _section(name, keys, table)
    for name in ("states", "actions"):
        sec = sections[name]
        if sec is not None and not sec.lower < sec.upper:
            raise ConfigError(f"{name}.lower: must be < {name}.upper (got {sec.lower} >= {sec.upper})")
    flow = sections["flow"]
    if flow.dt > flow.t_end:
        raise ConfigError(f"flow.dt: must be <= flow.t_end ({flow.t_end})")
    return Config(**sections)


def _section(name: str, keys: dict[str, Key], table: dict):
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key (allowed: {', '.join(keys)})")
    values = {}
    for key, spec in keys.items():
        full = f"{name}.{key}"
        if key not in table:
            if spec.default is REQUIRED:
                raise ConfigError(f"{full}: missing required key")
            values[key] = spec.default
            continue
        value = _coerce(full, table[key], spec.kind)
        if spec.check is not None and (problem := spec.check(value)):
            raise ConfigError(f"{full}: {problem} (got {value!r})")
        values[key] = value
    return _SECTIONS[name](**values)


def _coerce(full: str, value: Any, kind: type) -> Any:
    """Accept ints where floats are expected; reject bools posing as numbers and everything else."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (bool, str, dict) and isinstance(value, kind):
        return value
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "a table"}
    raise ConfigError(f"{full}: must be {names[kind]} (got {value!r})")


def to_toml(data: dict) -> str:
    """Serialise a config dict (tables of scalars, one level of sub-tables) as TOML."""
    lines: list[str] = []

    def emit(prefix: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in tables.items():
            emit(f"{prefix}.{k}" if prefix else k, v)

    emit("", data)
    return "\n".join(lines).lstrip("\n")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "inf" if v == math.inf else "-inf" if v == -math.inf else "nan" if v != v else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
