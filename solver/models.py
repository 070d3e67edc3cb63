"""MDP models: reward ``r(s, a)`` and controlled dynamics ``s' = f(s, a) + sigma * xi``.

Built-in models (rewards in the maximisation convention of math.md):

* ``lqr``: ``f = A s + B a``, ``r = -(q s^2 + r a^2)``; closed form in math.md §7.1.
* ``double_well``: ``f = A s + B a``, ``r = -q s^2 - depth * ((a / width)^2 - 1)^2``: two action modes at
  ``a = +-width`` separated by a barrier of height ``depth``, so the WPG rate collapses like
  ``exp(-depth / tau)`` (math.md §5.4). With ``B = 0`` the action does not move the state and the barrier of
  ``Q*`` is exactly ``depth`` (math.md §8.7).
* ``bandit``: one state, ``r = -k (a - center)^2 / 2``; the flow is Ornstein-Uhlenbeck (math.md §7.3).

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
    """An MDP with 1D states and actions, vectorised: ``s`` and ``a`` broadcast against each other.

    Attributes:
        reward: ``r(s, a)``.
        dynamics: mean next state ``f(s, a)``, or None for a one-state model (a bandit).
        sigma: standard deviation of the Gaussian transition noise (> 0 unless ``dynamics`` is None).
    """

    reward: Callable[[Array, Array], Array]
    dynamics: Callable[[Array, Array], Array] | None
    sigma: float = 0.0

    @property
    def single_state(self) -> bool:
        return self.dynamics is None


def lqr(A: float = 0.9, B: float = 0.5, q: float = 1.0, r: float = 0.5, sigma: float = 0.3) -> Model:
    """Scalar linear-quadratic model, ``s' = A s + B a + sigma xi``, ``r(s, a) = -(q s^2 + r a^2)``."""
    return Model(reward=lambda s, a: -(q * s ** 2 + r * a ** 2), dynamics=lambda s, a: A * s + B * a,
                 sigma=sigma)


def double_well(A: float = 0.9, B: float = 0.0, q: float = 1.0, depth: float = 1.0, width: float = 1.0,
                sigma: float = 0.3) -> Model:
    """LQR dynamics with a double-well action reward ``-q s^2 - depth ((a/width)^2 - 1)^2``."""
    return Model(reward=lambda s, a: -q * s ** 2 - depth * ((a / width) ** 2 - 1.0) ** 2,
                 dynamics=lambda s, a: A * s + B * a, sigma=sigma)


def bandit(k: float = 1.0, center: float = 0.0) -> Model:
    """One state, ``r(a) = -k (a - center)^2 / 2``: the WPG flow is the OU Fokker-Planck equation."""
    return Model(reward=lambda s, a: -0.5 * k * (a - center) ** 2 + 0.0 * s, dynamics=None)


def _pos(x):
    return x > 0


def _any(x):
    return True


def _nonneg(x):
    return x >= 0


# name -> (factory, {param: (check, description of allowed values)})
BUILTIN: dict[str, tuple[Callable[..., Model], dict[str, tuple[Callable[[float], bool], str]]]] = {
    "lqr": (lqr, {"A": (_any, "a number"), "B": (_any, "a number"), "q": (_nonneg, ">= 0"),
                  "r": (_pos, "> 0"), "sigma": (_pos, "> 0")}),
    "double_well": (double_well, {"A": (_any, "a number"), "B": (_any, "a number"), "q": (_nonneg, ">= 0"),
                                  "depth": (_pos, "> 0"), "width": (_pos, "> 0"), "sigma": (_pos, "> 0")}),
    "bandit": (bandit, {"k": (_pos, "> 0"), "center": (_any, "a number")}),
}

_USER_MODEL = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def build(name: str, params: dict) -> Model:
    """Construct the model ``name`` with ``params``; raise :class:`ConfigError` naming the bad key."""
    if name in BUILTIN:
        factory, allowed = BUILTIN[name]
        for key, value in params.items():
            if key not in allowed:
                raise ConfigError(f"mdp.params.{key}: unknown parameter for model {name!r} "
                                  f"(allowed: {', '.join(allowed)})")
            check, what = allowed[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not check(value):
                raise ConfigError(f"mdp.params.{key}: must be {what} and finite (got {value!r})")
        return factory(**{k: float(v) for k, v in params.items()})
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
    return model
