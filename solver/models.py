"""MDP models: reward ``r(s, a)`` and controlled dynamics ``s' = f(s, a) + sigma * xi``.

Built-in models (rewards in the maximisation convention of math.md):

* ``lqr``: ``f = A s + B a``, ``r = -(q |s|^2 + a^T R a)``; closed forms in math.md §7.1 (scalar) and
  :func:`solver.oracles.lqr2_optimum` (scalar state, action in R^2). The shape of ``B`` picks the dimensions:

  - ``B`` a number: 1D state, 1D action (math.md §7.1);
  - ``B = [b1, b2]``: 1D state, 2D action, ``s' = A s + b1 a1 + b2 a2 + sigma xi``;
  - ``B = [[b11, b12], [b21, b22]]``: 2D state, 2D action, ``s' = A s + B a + sigma xi`` with ``A`` a 2x2
    matrix (a number means ``A I``) and isotropic noise ``sigma I``; the state cost is ``q |s|^2``.

  ``r`` is a number (``R = r I``) or, for a 2D action, a 2-vector (``R = diag(r)``).
* ``double_well``: ``f = A s + B a``, ``r = -q s^2 - depth * ((a / width)^2 - 1)^2``: two action modes at
  ``a = +-width`` separated by a barrier of height ``depth``, so the WPG rate collapses like
  ``exp(-depth / tau)`` (math.md §5.4). With ``B = 0`` the action does not move the state and the barrier of
  ``Q*`` is exactly ``depth`` (math.md §8.7).
* ``ring`` (2D action): ``r = -q s^2 - depth ((|a| / radius)^2 - 1)^2``, a circular valley of optimal actions
  at ``|a| = radius`` around a hump of height ``depth`` at ``a = 0``; ``f = A s + b . a`` (``B = [b1, b2]``,
  default 0: the action does not move the state).
* ``four_well`` (2D action): ``r = -q s^2 - depth [((a1/width)^2 - 1)^2 + ((a2/width)^2 - 1)^2]``, four modes
  at ``(+-width, +-width)``, neighbouring modes separated by saddles of height ``depth``; dynamics as ``ring``.
* ``bandit``: one state, ``r = -k |a - center|^2 / 2``; the flow is Ornstein-Uhlenbeck (math.md §7.3).
  ``center`` a number: 1D action; ``center = [c1, c2]``: 2D action (isotropic 2D OU).
* ``double_well_bandit``: one state, ``r = -depth ((a / width)^2 - 1)^2``; the Eyring-Kramers / Arrhenius
  oracle of math.md §5.4 (the barrier of ``Q`` is the reward's, ``depth``).

Array conventions (``.coordination/interfaces.md``): a 1D-state model receives ``s`` of shape ``(N, 1)``; a
2D-state model ``(N, 1, 2)``. A 1D-action model receives ``a`` of shape ``(1, M)``; a 2D-action model
``(1, M, 2)``. ``reward`` returns ``(N, M)`` (or anything broadcasting to it); ``dynamics`` returns ``(N, M)``
for a 1D state and ``(N, M, 2)`` for a 2D state.

A user model is named ``package.module:function``; the function is called with the ``[mdp.params]``
table as keyword arguments and must return a :class:`Model`. The name is only ever used by
:func:`importlib.import_module` and :func:`getattr`.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .config import ConfigError

Array = np.ndarray


@dataclass(frozen=True)
class Model:
    """An MDP with 1D or 2D states and actions, vectorised (shapes in the module docstring).

    Attributes:
        reward: ``r(s, a)``.
        dynamics: mean next state ``f(s, a)``, or None for a one-state model (a bandit).
        sigma: standard deviation of the (isotropic) Gaussian transition noise (> 0 unless ``dynamics`` is None).
        action_dim: dimension ``d`` of the action domain (1 or 2).
        state_dim: dimension of the state (1 or 2).
    """

    reward: Callable[[Array, Array], Array]
    dynamics: Callable[[Array, Array], Array] | None
    sigma: float = 0.0
    action_dim: int = 1
    state_dim: int = 1

    @property
    def single_state(self) -> bool:
        return self.dynamics is None


def _shape(x) -> str:
    return {0: "a number", 1: "a list of 2 numbers"}.get(np.ndim(x), "a 2x2 matrix")


def lqr(A=0.9, B=0.5, q: float = 1.0, r=0.5, sigma: float = 0.3) -> Model:
    """Linear-quadratic model ``s' = A s + B a + sigma xi``, ``r(s, a) = -(q |s|^2 + a^T R a)``.

    Args:
        A: a number, or a 2x2 matrix when ``B`` is 2x2 (2D state).
        B: a number (1D action), a 2-vector (1D state, 2D action) or a 2x2 matrix (2D state, 2D action).
        q: state cost.
        r: action cost, a number (``R = r I``) or a 2-vector (``R = diag(r)``, 2D actions only).
        sigma: noise standard deviation (isotropic for a 2D state).

    Raises:
        ConfigError: if the shapes of ``A``, ``B`` and ``r`` do not fit together.
    """
    A, B, R = (np.asarray(x, dtype=float) for x in (A, B, r))
    if B.ndim == 0:
        if A.ndim or R.ndim:
            key, bad = ("A", A) if A.ndim else ("r", R)
            raise ConfigError(f"mdp.params.{key}: must be a number when B is a number (got {_shape(bad)})")
        return Model(reward=lambda s, a: -(q * s ** 2 + R * a ** 2), dynamics=lambda s, a: A * s + B * a,
                     sigma=sigma)
    diag_r = R * np.ones(2)
    if B.shape == (2,):
        if A.ndim:
            raise ConfigError(f"mdp.params.A: must be a number when B is a 2-vector (got {_shape(A)})")
        return Model(reward=lambda s, a: -(q * s ** 2 + (a ** 2) @ diag_r), dynamics=lambda s, a: A * s + a @ B,
                     sigma=sigma, action_dim=2)
    A2 = A * np.eye(2) if A.ndim == 0 else A
    if A2.shape != (2, 2):
        raise ConfigError(f"mdp.params.A: must be a number or a 2x2 matrix when B is 2x2 (got {_shape(A)})")
    return Model(reward=lambda s, a: -(q * np.sum(s ** 2, axis=-1) + (a ** 2) @ diag_r),
                 dynamics=lambda s, a: s @ A2.T + a @ B.T, sigma=sigma, action_dim=2, state_dim=2)


def double_well(A: float = 0.9, B: float = 0.0, q: float = 1.0, depth: float = 1.0, width: float = 1.0,
                sigma: float = 0.3) -> Model:
    """LQR dynamics with a double-well action reward ``-q s^2 - depth ((a/width)^2 - 1)^2``."""
    return Model(reward=lambda s, a: -q * s ** 2 - depth * ((a / width) ** 2 - 1.0) ** 2,
                 dynamics=lambda s, a: A * s + B * a, sigma=sigma)


def ring(A: float = 0.9, B=(0.0, 0.0), q: float = 1.0, depth: float = 1.0, radius: float = 1.0,
         sigma: float = 0.3) -> Model:
    """2D action, ring-shaped reward ``-q s^2 - depth ((|a|/radius)^2 - 1)^2``, dynamics ``A s + b . a``."""
    b = np.asarray(B, dtype=float) * np.ones(2)
    return Model(reward=lambda s, a: -q * s ** 2 - depth * (np.sum(a ** 2, axis=-1) / radius ** 2 - 1.0) ** 2,
                 dynamics=lambda s, a: A * s + a @ b, sigma=sigma, action_dim=2)


def four_well(A: float = 0.9, B=(0.0, 0.0), q: float = 1.0, depth: float = 1.0, width: float = 1.0,
              sigma: float = 0.3) -> Model:
    """2D action, four wells: ``-q s^2 - depth sum_i ((a_i/width)^2 - 1)^2``, dynamics ``A s + b . a``."""
    b = np.asarray(B, dtype=float) * np.ones(2)
    return Model(reward=lambda s, a: -q * s ** 2 - depth * np.sum(((a / width) ** 2 - 1.0) ** 2, axis=-1),
                 dynamics=lambda s, a: A * s + a @ b, sigma=sigma, action_dim=2)


def bandit(k: float = 1.0, center=0.0) -> Model:
    """One state, ``r(a) = -k |a - center|^2 / 2``: the WPG flow is the OU Fokker-Planck equation.

    ``center`` a number gives a 1D action, a 2-vector a 2D action (``a`` of shape ``(1, M, 2)``).
    """
    c = np.asarray(center, dtype=float)
    if c.ndim == 0:
        return Model(reward=lambda s, a: -0.5 * k * (a - c) ** 2 + 0.0 * s, dynamics=None)
    return Model(reward=lambda s, a: -0.5 * k * np.sum((a - c) ** 2, axis=-1) + 0.0 * s, dynamics=None,
                 action_dim=2)


def double_well_bandit(depth: float = 1.0, width: float = 1.0) -> Model:
    """One state, ``r(a) = -depth ((a / width)^2 - 1)^2``: modes at ``a = +-width``, barrier ``depth`` at ``a = 0``.

    With one state ``Q = r + gamma V`` (a constant shift), so the WPG flow is the linear Fokker-Planck equation
    of the Gibbs density ``G ∝ mu exp(r / tau)``. With Lebesgue ``mu``, ``|r''(+-width)| = 8 depth / width^2``
    and ``|r''(0)| = 4 depth / width^2``, so for ``tau << depth`` the asymptotic gap rate is (Eyring-Kramers,
    math.md §5.4) ``2 tau lambda_P ≈ (2/pi) sqrt(|r''_+-| |r''_0|) exp(-depth/tau)
    = (8 sqrt(2) / pi) (depth / width^2) exp(-depth / tau)``, up to relative corrections ``O(tau / depth)``.
    """
    return Model(reward=lambda s, a: -depth * ((a / width) ** 2 - 1.0) ** 2 + 0.0 * s, dynamics=None)


def _pos(x):
    return x > 0


def _any(x):
    return True


def _nonneg(x):
    return x >= 0


# name -> (factory, {param: (check, description of allowed values)}); checks apply elementwise to lists.
BUILTIN: dict[str, tuple[Callable[..., Model], dict[str, tuple[Callable[[float], bool], str]]]] = {
    "lqr": (lqr, {"A": (_any, "a number"), "B": (_any, "a number"), "q": (_nonneg, ">= 0"),
                  "r": (_pos, "> 0"), "sigma": (_pos, "> 0")}),
    "double_well": (double_well, {"A": (_any, "a number"), "B": (_any, "a number"), "q": (_nonneg, ">= 0"),
                                  "depth": (_pos, "> 0"), "width": (_pos, "> 0"), "sigma": (_pos, "> 0")}),
    "ring": (ring, {"A": (_any, "a number"), "B": (_any, "a number"), "q": (_nonneg, ">= 0"),
                    "depth": (_pos, "> 0"), "radius": (_pos, "> 0"), "sigma": (_pos, "> 0")}),
    "four_well": (four_well, {"A": (_any, "a number"), "B": (_any, "a number"), "q": (_nonneg, ">= 0"),
                              "depth": (_pos, "> 0"), "width": (_pos, "> 0"), "sigma": (_pos, "> 0")}),
    "bandit": (bandit, {"k": (_pos, "> 0"), "center": (_any, "a number")}),
    "double_well_bandit": (double_well_bandit, {"depth": (_pos, "> 0"), "width": (_pos, "> 0")}),
}

#: Parameters that also accept lists: model -> {param: allowed array shapes}. Anything else must be a number.
ARRAY_PARAMS: dict[str, dict[str, tuple[tuple[int, ...], ...]]] = {
    "lqr": {"A": ((2, 2),), "B": ((2,), (2, 2)), "r": ((2,),)},
    "ring": {"B": ((2,),)},
    "four_well": {"B": ((2,),)},
    "bandit": {"center": ((2,),)},
}

_USER_MODEL = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _describe(shapes: tuple[tuple[int, ...], ...]) -> str:
    names = {(2,): "a list of 2 numbers", (2, 2): "a 2x2 nested list"}
    return "".join(f" or {names[s]}" for s in shapes)


def _parameter(model: str, key: str, value, check: Callable, what: str):
    """Validate one builtin parameter: a float, or an array of an allowed shape (:data:`ARRAY_PARAMS`)."""
    shapes = ARRAY_PARAMS.get(model, {}).get(key, ())
    if what == "a number":
        allowed = f"must be a number{_describe(shapes)} and finite"
    else:
        allowed = f"must be {what}{f' (a number{_describe(shapes)})' if shapes else ''} and finite"
    if isinstance(value, (list, tuple)) and shapes:
        try:
            array = np.asarray(value, dtype=float)
        except (TypeError, ValueError):  # ragged or non-numeric
            raise ConfigError(f"mdp.params.{key}: {allowed} (got {value!r})") from None
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                      for v in np.asarray(value, dtype=object).ravel())
        if not (numbers and array.shape in shapes and np.all(np.isfinite(array)) and np.all(check(array))):
            raise ConfigError(f"mdp.params.{key}: {allowed} (got {value!r})")
        return array
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not check(value):
        raise ConfigError(f"mdp.params.{key}: {allowed} (got {value!r})")
    return float(value)


def build(name: str, params: dict) -> Model:
    """Construct the model ``name`` with ``params``; raise :class:`ConfigError` naming the bad key."""
    if name in BUILTIN:
        factory, allowed = BUILTIN[name]
        values = {}
        for key, value in params.items():
            if key not in allowed:
                raise ConfigError(f"mdp.params.{key}: unknown parameter for model {name!r} "
                                  f"(allowed: {', '.join(allowed)})")
            values[key] = _parameter(name, key, value, *allowed[key])
        return factory(**values)
    if not _USER_MODEL.match(name):
        raise ConfigError(f"mdp.model: unknown model {name!r} (allowed: {', '.join(BUILTIN)}, "
                          "or 'package.module:function')")
    module_name, func_name = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"mdp.model: cannot import module {module_name!r} ({exc})") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ConfigError(f"mdp.model: module {module_name!r} has no function {func_name!r}")
    try:
        model = factory(**params)
    except TypeError as exc:
        raise ConfigError(f"mdp.params: rejected by {name} ({exc})") from None
    if not isinstance(model, Model):
        raise ConfigError(f"mdp.model: {name} must return solver.models.Model, got {type(model).__name__}")
    if model.dynamics is not None and not model.sigma > 0:
        raise ConfigError(f"mdp.model: {name} has dynamics, so its sigma must be > 0")
    if model.action_dim not in (1, 2) or model.state_dim not in (1, 2):
        raise ConfigError(f"mdp.model: {name} must have action_dim and state_dim 1 or 2 "
                          f"(got {model.action_dim}, {model.state_dim})")
    return model
