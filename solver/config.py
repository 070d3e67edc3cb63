"""Experiment configuration: TOML in, validated frozen dataclasses out.

Schema (every key optional unless marked *required*; defaults in :data:`SCHEMA`)::

    [mdp]     model*, gamma*, tau*, params = {...}
    [states]  lower, upper, n                       (omit for one-state models such as "bandit"); numbers for
              a uniform 1D grid, or lower = [x0, y0], upper = [x1, y1], n = [nx, ny] for a 2D grid (states
              ordered row-major over (nx, ny); the model must have state_dim = 2); rho_lower, rho_upper
              (same shape): the initial-state distribution rho is uniform on the grid points in that box
              (default: the whole grid; ``wpgflow study`` keeps it on the base box when it enlarges the domain)
    [actions] domain, lower, upper, cells, resolution, radius, scale, center,
              reference = "lebesgue" | "gaussian", reference_std
    [flow]    kind (a key of solver.flows.KINDS, e.g. "wasserstein"), scheme = "sg" | "sqra",
              dt, t_end, adaptive, adapt_tol, dt_max, gap_tol, init = "uniform" | "gaussian", init_mean,
              init_std, particles, seed
    [output]  snapshots, animation
    [sweep]   param*, values*, kinds          (read by ``wpgflow sweep`` only; ``wpgflow run`` ignores it)

The action domain ``[actions] domain`` (default "interval") decides which other keys of ``[actions]`` apply
(any other is a ConfigError; see :func:`_check_actions`)::

    "interval"                     lower*, upper* (numbers), cells (int >= 2, default 256): uniform 1D mesh
    "rectangle"                    lower*, upper* (2-vectors [x, y]), cells (int n or [nx, ny], default 16):
                                   DOLFINx's structured crossed-diagonal mesh of the box
    "disk"                         radius (default 1), center (default [0, 0]), resolution: the shipped mesh
                                   meshes/disk_<resolution>.xdmf of the unit disk, mapped by a -> center + radius a
    "lshape", "annulus"            scale (default 1), center, resolution: meshes/<domain>_<resolution>.xdmf
                                   ([-1, 1]^2 minus (0, 1]^2; 1/2 <= |a| <= 1), mapped by a -> center + scale a
    "<path>.xdmf"                  scale, center: any XDMF triangle mesh (path relative to the working directory)

``resolution`` is "fine" (default) or "coarse" (meshes/README.md lists their sizes). Keys a domain does not use
are left None (and not written to the run's ``config.toml``).

Config strings are data: a model name is looked up in a registry or imported as
``package.module:function`` by :mod:`solver.models`; nothing is ever passed to ``eval``/``exec``.
Every error is a :class:`ConfigError` whose message names the key and what is allowed.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, replace
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


#: Largest magnitude of a coordinate or a length scale (grid bounds, centres, standard deviations, radii):
#: beyond it squares overflow and grid steps lose every digit.
MAX_MAGNITUDE = 1e12


def _finite(x):
    return None if math.isfinite(x) and abs(x) <= MAX_MAGNITUDE else \
        f"must be a finite number of magnitude at most {MAX_MAGNITUDE:g}"


def _scale(x):
    ok = math.isfinite(x) and 1 / MAX_MAGNITUDE <= x <= MAX_MAGNITUDE
    return None if ok else f"must be a finite number > 0, in [{1 / MAX_MAGNITUDE:g}, {MAX_MAGNITUDE:g}]"


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


#: Largest discount: soft policy iteration and the exact evaluation solve ``I - gamma P^pi``, whose condition
#: number is ``~1 / (1 - gamma)``; above ``1 - 1e-5`` soft policy iteration stops converging to 1e-12 in double
#: precision (measured: 0.99999 converges on lqr_1d, 0.9999999 does not).
MAX_GAMMA = 0.99999

#: Smallest temperature: ``Q / tau`` must stay far from the overflow of ``exp`` (``tau = 1e-6`` already breaks the
#: generator-gap eigen-solve on lqr_1d; the run checks ``Q* / tau`` on the mesh itself, solver.preflight.preflight).
MIN_TAU = 1e-8

#: Largest ``output.snapshots``: each snapshot keeps ``N`` values (and policies within a budget); 1e9 would
#: allocate gigabytes for the schedule alone.
MAX_SNAPSHOTS = 10000


def _discount(x):
    return None if 0 <= x <= MAX_GAMMA else f"must be in [0, 1), at most {MAX_GAMMA} (1 - gamma >= 1e-5)"


def _temperature(x):
    return None if math.isfinite(x) and x >= MIN_TAU else f"must be a finite number > 0, at least {MIN_TAU:g}"


def _snapshots(x):
    return None if 2 <= x <= MAX_SNAPSHOTS else f"must be an integer in [2, {MAX_SNAPSHOTS}]"


def dotted_key_problem(x):
    """Why ``x`` is not a dotted config key such as ``"mdp.tau"`` (None if it is one)."""
    parts = x.split(".")
    ok = len(parts) >= 2 and all(part.isidentifier() for part in parts) and parts[0] != "sweep"
    return None if ok else "must be a dotted config key such as 'mdp.tau'"


def _numbers(x):
    ok = bool(x) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in x)
    if not ok:
        return "must be a non-empty list of finite numbers"
    return None if len(set(x)) == len(x) else "must not repeat a value"


def _kinds(x):
    ok = bool(x) and all(isinstance(k, str) for k in x) and len(set(x)) == len(x)
    return None if ok else "must be a non-empty list of distinct flow kinds (strings)"


def _kind(x):
    return None if x else "must be a flow kind (a non-empty string)"


#: ``actions.domain``: built-in domains (besides a path to an ``.xdmf`` mesh); the shapes among them shipped as
#: mesh files ``meshes/<shape>_<resolution>.xdmf``, and their resolutions.
ACTION_DOMAINS = ("interval", "rectangle", "disk", "lshape", "annulus")
MESH_SHAPES = ("disk", "lshape", "annulus")
MESH_RESOLUTIONS = ("coarse", "fine")

#: The default: the fine meshes meet the issue's accuracy bars (2D OU density L1 1.6e-3 on the fine disk, 8e-3 on
#: the coarse one; tests/test_2d.py). "coarse" is for quick looks and tests.
DEFAULT_RESOLUTION = "fine"


def _domain(x):
    if x in ACTION_DOMAINS or x.endswith(".xdmf"):
        return None
    return f"must be one of {', '.join(map(repr, ACTION_DOMAINS))} or a path to an .xdmf mesh"


SCHEMA: dict[str, dict[str, Key]] = {
    "mdp": {
        "model": Key(str, REQUIRED),
        "gamma": Key(float, REQUIRED, _discount),
        "tau": Key(float, REQUIRED, _temperature),
        "params": Key(dict, {}),
    },
    "states": {  # a number each (1D grid) or 2-lists [x, y] each (2D grid): checked by _check_states
        "lower": Key(object, -1.0),
        "upper": Key(object, 1.0),
        "n": Key(object, 1),
        "rho_lower": Key(object, None),
        "rho_upper": Key(object, None),
    },
    "actions": {  # lower, upper, cells, center: checked per domain by _check_actions (None = not given)
        "domain": Key(str, "interval", _domain),
        "lower": Key(object, None),
        "upper": Key(object, None),
        "cells": Key(object, None),
        "resolution": Key(str, None, _one_of(*MESH_RESOLUTIONS)),
        "radius": Key(float, None, _scale),
        "scale": Key(float, None, _scale),
        "center": Key(object, None),
        "reference": Key(str, "lebesgue", _one_of("lebesgue", "gaussian")),
        "reference_std": Key(float, 1.0, _scale),
    },
    "flow": {
        # the kinds are those of solver.flows.KINDS, checked where the flow is made (solver.runner.build): this
        # module is the bottom layer and knows no flow
        "kind": Key(str, "wasserstein", _kind),
        "scheme": Key(str, "sg", _one_of("sg", "sqra")),
        "integrator": Key(str, "implicit", _one_of("implicit", "exponential")),  # solver/flows/wasserstein.py
        "dt": Key(float, 0.01, _positive),
        "t_end": Key(float, 10.0, _positive),
        "adaptive": Key(bool, False),
        "adapt_tol": Key(float, 1e-3, _positive),
        "dt_max": Key(float, math.inf, lambda x: None if x > 0 else "must be > 0"),
        "gap_tol": Key(float, 1e-10, lambda x: None if x >= 0 else "must be >= 0"),
        "init": Key(str, "uniform", _one_of("uniform", "gaussian")),
        "init_mean": Key(float, 0.0, _finite),
        "init_std": Key(float, 1.0, _scale),
        "particles": Key(int, 1000, _at_least_one),
        "seed": Key(int, 0, lambda x: None if x >= 0 else "must be an integer >= 0"),
        "entropy": Key(bool, True),  # solver/flows/gaussian_wpo.py
        "covariance": Key(str, "full", _one_of("full", "diagonal")),  # solver/flows/gaussian_wpo.py
    },
    "output": {
        "snapshots": Key(int, 20, _snapshots),
        # steps between two checkpoints (checkpoint.npz, for ``wpgflow run --resume``); 0 = none; large runs also
        # follow a wall-time rule (solver.checkpoint.CHECKPOINT_MIN_ENTRIES)
        "checkpoint_every": Key(int, 100, lambda x: None if x >= 0 else "must be an integer >= 0 (0: no checkpoints)"),
        "animation": Key(bool, False),  # density.gif at the end of the run (solver/plots/animate.py)
    },
    "sweep": {
        "param": Key(str, REQUIRED, dotted_key_problem),
        "values": Key(list, REQUIRED, _numbers),
        "kinds": Key(list, (), lambda x: None if not x else _kinds(x)),
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
    """``[states]``: numbers for a uniform 1D grid, or 2-lists ``[x, y]`` for a 2D grid (:func:`_check_states`)."""

    lower: float | list
    upper: float | list
    n: int | list
    rho_lower: float | list | None = None
    rho_upper: float | list | None = None


@dataclass(frozen=True)
class ActionsConfig:
    """``[actions]``; the keys the domain does not use are None (module docstring)."""

    lower: float | list | None
    upper: float | list | None
    cells: int | list | None
    reference: str
    reference_std: float
    domain: str = "interval"
    resolution: str | None = None
    radius: float | None = None
    scale: float | None = None
    center: list | None = None


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
    particles: int = 1000
    seed: int = 0
    integrator: str = "implicit"
    entropy: bool = True
    covariance: str = "full"


@dataclass(frozen=True)
class OutputConfig:
    snapshots: int
    animation: bool = False
    checkpoint_every: int = 100


@dataclass(frozen=True)
class SweepConfig:
    """``wpgflow sweep`` defaults: the swept key, its values, and the flow kinds (empty: ``flow.kind``)."""

    param: str
    values: list
    kinds: list


@dataclass(frozen=True)
class Config:
    """A validated experiment. ``states`` / ``sweep`` are None when the config has no such table."""

    mdp: MDPConfig
    states: StatesConfig | None
    actions: ActionsConfig
    flow: FlowConfig
    output: OutputConfig
    sweep: SweepConfig | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("states", "sweep"):
            if d[name] is None:
                del d[name]
        d["actions"] = {k: v for k, v in d["actions"].items() if v is not None}
        if "states" in d:
            d["states"] = {k: v for k, v in d["states"].items() if v is not None}
        return d


_SECTIONS = {"mdp": MDPConfig, "states": StatesConfig, "actions": ActionsConfig, "flow": FlowConfig,
             "output": OutputConfig, "sweep": SweepConfig}
_OPTIONAL_SECTIONS = ("states", "flow", "output", "sweep")


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a TOML file, apply ``key=value`` overrides (see :func:`apply_override`) and validate."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:  # before ValueError: it is one
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
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
        raise ConfigError(f"{unknown[0]}: unknown section (allowed: {', '.join(SCHEMA)})"
                          f"{did_you_mean(unknown[0], SCHEMA)}")
    sections = {}
    for name, keys in SCHEMA.items():
        table = raw.get(name)
        if table is None and name in _OPTIONAL_SECTIONS:
            sections[name] = None if name in ("states", "sweep") else _section(name, keys, {})
            continue
        if table is None:
            raise ConfigError(f"{name}: missing required section [{name}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: must be a table [{name}]")
        sections[name] = _section(name, keys, table)
    sections["actions"] = _check_actions(sections["actions"])
    if sections["states"] is not None:
        sections["states"] = _check_states(sections["states"])
    flow = sections["flow"]
    if flow.dt > flow.t_end:
        raise ConfigError(f"flow.dt: must be <= flow.t_end ({flow.t_end})")
    return Config(**sections)


#: ``[actions]`` keys that each kind of domain uses (a path to an .xdmf mesh: "path").
_DOMAIN_KEYS = {"interval": ("lower", "upper", "cells"), "rectangle": ("lower", "upper", "cells"),
                "disk": ("resolution", "radius", "center"), "lshape": ("resolution", "scale", "center"),
                "annulus": ("resolution", "scale", "center"), "path": ("scale", "center")}


def _check_actions(a: ActionsConfig) -> ActionsConfig:
    """Check the ``[actions]`` keys of ``a.domain`` (module docstring) and fill in that domain's defaults."""
    kind = a.domain if a.domain in ACTION_DOMAINS else "path"
    used = _DOMAIN_KEYS[kind]
    for key in ("lower", "upper", "cells", "resolution", "radius", "scale", "center"):
        if getattr(a, key) is not None and key not in used:
            raise ConfigError(f"actions.{key}: not used by domain {a.domain!r} (its keys: {', '.join(used)})")
    for key in ("lower", "upper"):
        if key in used and getattr(a, key) is None:
            raise ConfigError(f"actions.{key}: missing required key (domain {a.domain!r})")
    if kind == "interval":
        lower, upper = (_coerce(f"actions.{k}", getattr(a, k), float) for k in ("lower", "upper"))
        cells = 256 if a.cells is None else _coerce("actions.cells", a.cells, int)
        for key, value, problem in (("lower", lower, _finite(lower)), ("upper", upper, _finite(upper)),
                                    ("cells", cells, _at_least_two(cells))):
            if problem:
                raise ConfigError(f"actions.{key}: {problem} (got {value!r})")
        if not upper - lower >= 1e-9 * max(1.0, abs(lower), abs(upper)):
            raise ConfigError(f"actions.lower: must be < actions.upper, by at least 1e-9 of their magnitude "
                              f"(got {lower}, {upper})")
        return replace(a, lower=lower, upper=upper, cells=cells)
    if kind == "rectangle":
        lower, upper = (_vector(f"actions.{k}", getattr(a, k)) for k in ("lower", "upper"))
        if not all(lo < hi for lo, hi in zip(lower, upper)):
            raise ConfigError(f"actions.lower: must be < actions.upper in both coordinates (got {lower}, {upper})")
        cells = 16 if a.cells is None else a.cells
        cells = [cells, cells] if isinstance(cells, int) and not isinstance(cells, bool) else cells
        if not (isinstance(cells, list) and len(cells) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in cells)):
            raise ConfigError(f"actions.cells: must be an integer >= 1 or a list [nx, ny] of two (got {a.cells!r})")
        return replace(a, lower=lower, upper=upper, cells=cells)
    center = [0.0, 0.0] if a.center is None else _vector("actions.center", a.center)
    resolution = None if kind == "path" else a.resolution or DEFAULT_RESOLUTION
    if kind == "disk":
        return replace(a, center=center, resolution=resolution, radius=1.0 if a.radius is None else a.radius)
    return replace(a, center=center, resolution=resolution, scale=1.0 if a.scale is None else a.scale)


def _check_states(st: StatesConfig) -> StatesConfig:
    """A 1D grid (``lower``, ``upper`` numbers, ``n >= 1``) or a 2D grid (2-lists, ``n = [nx, ny]``, each >= 2)."""
    two_d = [isinstance(getattr(st, key), (list, tuple)) for key in ("lower", "upper", "n")]
    if not any(two_d):
        lower, upper = (_coerce(f"states.{k}", getattr(st, k), float) for k in ("lower", "upper"))
        n = _coerce("states.n", st.n, int)
        for key, value, problem in (("lower", lower, _finite(lower)), ("upper", upper, _finite(upper)),
                                    ("n", n, _at_least_one(n))):
            if problem:
                raise ConfigError(f"states.{key}: {problem} (got {value!r})")
        if not upper - lower >= 1e-9 * max(1.0, abs(lower), abs(upper)):
            raise ConfigError(f"states.lower: must be < states.upper, by at least 1e-9 of their magnitude "
                              f"(got {lower}, {upper})")
        box = [_coerce(f"states.{k}", getattr(st, k), float) if getattr(st, k) is not None else None
               for k in ("rho_lower", "rho_upper")]
        rho = _check_rho_box([[b] if b is not None else None for b in box], [lower], [upper])
        rho_lower, rho_upper = (None if b is None else b[0] for b in rho)
        return replace(st, lower=lower, upper=upper, n=n, rho_lower=rho_lower, rho_upper=rho_upper)
    if not all(two_d):
        key = ("lower", "upper", "n")[two_d.index(False)]
        raise ConfigError(f"states.{key}: must be a list [x, y] like the other [states] keys of a 2D state grid "
                          f"(got {getattr(st, key)!r})")
    lower, upper = (_vector(f"states.{k}", getattr(st, k)) for k in ("lower", "upper"))
    n = st.n
    if not (len(n) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in n)):
        raise ConfigError(f"states.n: must be a list [nx, ny] of two integers >= 2 for a 2D state grid (got {n!r})")
    if not all(lo < hi for lo, hi in zip(lower, upper)):
        raise ConfigError(f"states.lower: must be < states.upper in both coordinates (got {lower}, {upper})")
    box = [_vector(f"states.{k}", getattr(st, k)) if getattr(st, k) is not None else None
           for k in ("rho_lower", "rho_upper")]
    rho = _check_rho_box(box, lower, upper)
    return replace(st, lower=lower, upper=upper, n=list(n), rho_lower=rho[0], rho_upper=rho[1])


def _check_rho_box(box: list, lower: list[float], upper: list[float]) -> list:
    """``[states] rho_lower, rho_upper``: the box (per axis) on whose grid points the initial-state distribution
    ``rho`` is uniform; each defaults to the grid's end, must lie in ``[lower, upper]`` and be ordered. Returns
    ``[rho_lower, rho_upper]`` as given (None where not given)."""
    lo = box[0] if box[0] is not None else lower
    hi = box[1] if box[1] is not None else upper
    for key, values in (("rho_lower", lo), ("rho_upper", hi)):
        for v, a, b in zip(values, lower, upper):
            if not (math.isfinite(v) and a - 1e-9 * max(1.0, abs(a)) <= v <= b + 1e-9 * max(1.0, abs(b))):
                raise ConfigError(f"states.{key}: must lie within [states.lower, states.upper] = [{lower}, {upper}] "
                                  f"(got {values})")
    if not all(a <= b for a, b in zip(lo, hi)):
        raise ConfigError(f"states.rho_lower: must be <= states.rho_upper (got {lo}, {hi})")
    return box


def _vector(full: str, value: Any) -> list[float]:
    """A 2-vector ``[x, y]`` of finite numbers."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) is None for v in value)
    if not ok:
        raise ConfigError(f"{full}: must be a list [x, y] of two finite numbers of magnitude at most "
                          f"{MAX_MAGNITUDE:g} (got {value!r})")
    return [float(v) for v in value]


def inspect_xdmf(path: str | Path, key: str = "actions.domain") -> tuple[int, int]:
    """Check an XDMF action mesh before DOLFINx reads it; return ``(vertices, cells)``.

    DOLFINx trusts the file: an out-of-range vertex index in the topology makes its reader hang or crash. This
    reads the XML of the grid named ``mesh`` (else the first grid with a topology and a geometry) and, for data
    inline as XML, checks that the topology holds ``NumberOfElements x NodesPerElement`` integers in
    ``[0, vertices)`` and the geometry ``vertices x dim`` finite numbers. Data in an HDF5 file (``Format="HDF"``)
    is checked by its declared dimensions only.

    Raises:
        ConfigError: naming ``key`` and the file.
    """
    import xml.etree.ElementTree as ET

    import numpy as np

    path = Path(path)
    where = f"{key}: mesh {path}"
    if not path.is_file():
        raise ConfigError(f"{key}: mesh file {path} not found (a built-in domain name or a path to an .xdmf mesh)")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{where} is not a valid XDMF file ({' '.join(str(exc).split())})") from None
    grids = [g for g in root.iter("Grid") if g.find("Topology") is not None and g.find("Geometry") is not None]
    grids.sort(key=lambda g: g.get("Name") != "mesh")
    if not grids:
        raise ConfigError(f"{where} has no grid with a Topology and a Geometry (an XDMF triangle mesh is needed)")
    topology, geometry = grids[0].find("Topology"), grids[0].find("Geometry")
    items = topology.find("DataItem"), geometry.find("DataItem")
    if items[0] is None or items[1] is None:
        raise ConfigError(f"{where}: its Topology and Geometry need a DataItem each")

    def dimensions(item, what: str) -> list[int]:
        try:
            dims = [int(v) for v in (item.get("Dimensions") or "").split()]
        except ValueError:
            dims = []
        if len(dims) != 2 or min(dims) < 1:
            raise ConfigError(f"{where}: the {what} DataItem needs Dimensions=\"rows columns\" (got "
                              f"{item.get('Dimensions')!r})")
        return dims

    (cells, per_cell), (vertices, dim) = dimensions(items[0], "Topology"), dimensions(items[1], "Geometry")
    if items[0].get("Format", "XML").upper() == "XML":
        text = (items[0].text or "").split()
        try:
            index = np.array([int(v) for v in text], dtype=np.int64)
        except ValueError:
            raise ConfigError(f"{where}: the topology must hold integer vertex indices") from None
        if index.size != cells * per_cell:
            raise ConfigError(f"{where}: the topology holds {index.size} indices, its Dimensions say "
                              f"{cells} x {per_cell}")
        if index.size and (index.min() < 0 or index.max() >= vertices):
            raise ConfigError(f"{where}: a cell refers to vertex {int(index.min() if index.min() < 0 else index.max())}"
                              f", outside 0..{vertices - 1} (the geometry has {vertices} vertices)")
    if items[1].get("Format", "XML").upper() == "XML":
        try:
            xy = np.array([float(v) for v in (items[1].text or "").split()])
        except ValueError:
            raise ConfigError(f"{where}: the geometry must hold numbers") from None
        if xy.size != vertices * dim or not np.all(np.isfinite(xy)):
            raise ConfigError(f"{where}: the geometry must hold {vertices} x {dim} finite numbers "
                              f"(got {xy.size} values)")
    return vertices, cells


def flow_config(**options) -> FlowConfig:
    """A validated ``[flow]`` table from keyword options, defaults for the rest (for notebooks and tests).

    >>> flow_config(dt=0.1).dt
    0.1
    """
    return _section("flow", SCHEMA["flow"], options)


def _section(name: str, keys: dict[str, Key], table: dict):
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key (allowed: {', '.join(keys)})"
                          f"{did_you_mean(unknown[0], keys)}")
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


def did_you_mean(word: str, allowed) -> str:
    """``"; did you mean 'x'?"`` for the closest allowed name (:func:`difflib.get_close_matches`), else ``""``.

    >>> did_you_mean("gama", ["model", "gamma", "tau"])
    "; did you mean 'gamma'?"
    """
    import difflib

    close = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _coerce(full: str, value: Any, kind: type) -> Any:
    """Accept ints where floats are expected; reject bools posing as numbers and everything else."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (bool, str, dict) and isinstance(value, kind):
        return value
    if kind is list and isinstance(value, (list, tuple)):
        return list(value)
    if kind is object:  # checked by the section's own validation
        return value
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "a table",
             list: "a list"}
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
