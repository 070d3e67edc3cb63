"""MDP models: reward ``r(s, a)`` and controlled dynamics ``s' = f(s, a) + sigma * xi``.

Built-in models (rewards in the maximisation convention of theory.md):

* ``lqr``: ``f = A s + B a``, ``r = -(q |s|^2 + a^T R a)``; closed forms in theory.md §7.1 (scalar) and
  :func:`solver.oracles.lqr2_optimum` (scalar state, action in R^2). The shape of ``B`` picks the dimensions:

  - ``B`` a number: 1D state, 1D action (theory.md §7.1);
  - ``B = [b1, b2]``: 1D state, 2D action, ``s' = A s + b1 a1 + b2 a2 + sigma xi``;
  - ``B = [[b11, b12], [b21, b22]]``: 2D state, 2D action, ``s' = A s + B a + sigma xi`` with ``A`` a 2x2
    matrix (a number means ``A I``) and isotropic noise ``sigma I``; the state cost is ``q |s|^2``.

  ``r`` is a number (``R = r I``) or, for a 2D action, a 2-vector (``R = diag(r)``).
* ``double_well``: ``f = A s + B a``, ``r = -q s^2 - depth * ((a / width)^2 - 1)^2``: two action modes at
  ``a = +-width`` separated by a barrier of height ``depth``, so the WPG rate collapses like
  ``exp(-depth / tau)`` (theory.md §5.4). With ``B = 0`` the action does not move the state and the barrier of
  ``Q*`` is exactly ``depth`` (theory.md §8.7).
* ``ring`` (2D action): ``r = -q s^2 - depth ((|a| / radius)^2 - 1)^2``, a circular valley of optimal actions
  at ``|a| = radius`` around a hump of height ``depth`` at ``a = 0``; ``f = A s + b . a`` (``B = [b1, b2]``,
  default 0: the action does not move the state).
* ``four_well`` (2D action): ``r = -q s^2 - depth [((a1/width)^2 - 1)^2 + ((a2/width)^2 - 1)^2]``, four modes
  at ``(+-width, +-width)``, neighbouring modes separated by saddles of height ``depth``; dynamics as ``ring``.
* ``bandit``: one state, ``r = -k |a - center|^2 / 2``; the flow is Ornstein-Uhlenbeck (theory.md §7.3).
  ``center`` a number: 1D action; ``center = [c1, c2]``: 2D action (isotropic 2D OU).
* ``double_well_bandit``: one state, ``r = -depth ((a / width)^2 - 1)^2``; the Eyring-Kramers / Arrhenius
  oracle of theory.md §5.4 (the barrier of ``Q`` is the reward's, ``depth``).

Array conventions (``.coordination/interfaces.md``): a 1D-state model receives ``s`` of shape ``(N, 1)``; a
2D-state model ``(N, 1, 2)``. A 1D-action model receives ``a`` of shape ``(1, M)``; a 2D-action model
``(1, M, 2)``. ``reward`` returns ``(N, M)`` (or anything broadcasting to it); ``dynamics`` returns ``(N, M)``
for a 1D state and ``(N, M, 2)`` for a 2D state.

A user model is named ``package.module:function``; the function must be registered as a wpgflow model with the
:func:`model` decorator, is called with the ``[mdp.params]`` table as keyword arguments and must return a
:class:`Model`. The name is only ever used by :func:`importlib.import_module` (which runs the module's top-level
code, as any import does) and a lookup in the module's namespace; a callable that is not registered (``os:system``,
any function of any module) is refused before it is called. Every failure of a user model (at import, in the
factory, in ``reward`` or ``dynamics``, wrong shapes, non-numbers, NaN or infinities: :func:`check_outputs`) is a
:class:`~solver.config.ConfigError` naming ``mdp.model``.
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
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
    interpolation: int = 1  # sigma = 0 (1D states): V interpolated at f(s, a), linear (1) or cubic (3)

    @property
    def single_state(self) -> bool:
        return self.dynamics is None


#: The factories registered by :func:`model`, by identity (the only callables a config may call).
_REGISTERED: dict[int, Callable] = {}


def model(factory: Callable[..., "Model"]) -> Callable[..., "Model"]:
    """Decorator: register ``factory`` as a wpgflow model, so that a config may name it as ``module:function``.

    Only registered factories are ever called from a config (``mdp.model``); anything else is refused unchecked::

        from solver.models import Model, model

        @model
        def my_model(k=1.0):
            return Model(reward=lambda s, a: -k * a ** 2, dynamics=lambda s, a: 0.5 * s + a, sigma=0.3)
    """
    if not callable(factory):
        raise TypeError("solver.models.model decorates a function returning a solver.models.Model")
    _REGISTERED[id(factory)] = factory
    return factory


def is_registered(obj) -> bool:
    """Whether ``obj`` is a factory registered with :func:`model` (by identity)."""
    return _REGISTERED.get(id(obj)) is obj


def _shape(x) -> str:
    return {0: "a number", 1: "a list of 2 numbers"}.get(np.ndim(x), "a 2x2 matrix")


@model
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


@model
def double_well(A: float = 0.9, B: float = 0.0, q: float = 1.0, depth: float = 1.0, width: float = 1.0,
                sigma: float = 0.3) -> Model:
    """LQR dynamics with a double-well action reward ``-q s^2 - depth ((a/width)^2 - 1)^2``."""
    return Model(reward=lambda s, a: -q * s ** 2 - depth * ((a / width) ** 2 - 1.0) ** 2,
                 dynamics=lambda s, a: A * s + B * a, sigma=sigma)


@model
def ring(A: float = 0.9, B=(0.0, 0.0), q: float = 1.0, depth: float = 1.0, radius: float = 1.0,
         sigma: float = 0.3) -> Model:
    """2D action, ring-shaped reward ``-q s^2 - depth ((|a|/radius)^2 - 1)^2``, dynamics ``A s + b . a``."""
    b = np.asarray(B, dtype=float) * np.ones(2)
    return Model(reward=lambda s, a: -q * s ** 2 - depth * (np.sum(a ** 2, axis=-1) / radius ** 2 - 1.0) ** 2,
                 dynamics=lambda s, a: A * s + a @ b, sigma=sigma, action_dim=2)


@model
def four_well(A: float = 0.9, B=(0.0, 0.0), q: float = 1.0, depth: float = 1.0, width: float = 1.0,
              sigma: float = 0.3) -> Model:
    """2D action, four wells: ``-q s^2 - depth sum_i ((a_i/width)^2 - 1)^2``, dynamics ``A s + b . a``."""
    b = np.asarray(B, dtype=float) * np.ones(2)
    return Model(reward=lambda s, a: -q * s ** 2 - depth * np.sum(((a / width) ** 2 - 1.0) ** 2, axis=-1),
                 dynamics=lambda s, a: A * s + a @ b, sigma=sigma, action_dim=2)


@model
def bandit(k: float = 1.0, center=0.0) -> Model:
    """One state, ``r(a) = -k |a - center|^2 / 2``: the WPG flow is the OU Fokker-Planck equation.

    ``center`` a number gives a 1D action, a 2-vector a 2D action (``a`` of shape ``(1, M, 2)``).
    """
    c = np.asarray(center, dtype=float)
    if c.ndim == 0:
        return Model(reward=lambda s, a: -0.5 * k * (a - c) ** 2 + 0.0 * s, dynamics=None)
    return Model(reward=lambda s, a: -0.5 * k * np.sum((a - c) ** 2, axis=-1) + 0.0 * s, dynamics=None,
                 action_dim=2)


@model
def double_well_bandit(depth: float = 1.0, width: float = 1.0) -> Model:
    """One state, ``r(a) = -depth ((a / width)^2 - 1)^2``: modes at ``a = +-width``, barrier ``depth`` at ``a = 0``.

    With one state ``Q = r + gamma V`` (a constant shift), so the WPG flow is the linear Fokker-Planck equation
    of the Gibbs density ``G ∝ mu exp(r / tau)``. With Lebesgue ``mu``, ``|r''(+-width)| = 8 depth / width^2``
    and ``|r''(0)| = 4 depth / width^2``, so for ``tau << depth`` the asymptotic gap rate is (Eyring-Kramers,
    theory.md §5.4) ``2 tau lambda_P ≈ (2/pi) sqrt(|r''_+-| |r''_0|) exp(-depth/tau)
    = (8 sqrt(2) / pi) (depth / width^2) exp(-depth / tau)``, up to relative corrections ``O(tau / depth)``.
    """
    return Model(reward=lambda s, a: -depth * ((a / width) ** 2 - 1.0) ** 2 + 0.0 * s, dynamics=None)


@model
def kink(A: float = 0.9, B: float = 0.5, q: float = 1.0, r: float = 0.5, c: float = 1.0, sigma: float = 0.3,
         interpolation: float = 1) -> Model:
    """A value function with a kink: ``r(s, a) = max(-q (s - c)^2, -q (s + c)^2) - r a^2``,
    ``s' = A s + B a + sigma xi``.

    The state reward is the max of two branches, convex-kinked at ``s = 0``; ``V*`` inherits the kink and
    ``Q(s, a) = r + gamma E V(A s + B a + sigma xi)`` carries it, smoothed over ``sigma``, to ``a = -A s / B``.
    ``sigma = 0`` is deterministic (``V`` interpolated at ``f``: ``interpolation`` 1 linear, 3 cubic).
    """
    return Model(reward=lambda s, a: np.maximum(-q * (s - c) ** 2, -q * (s + c) ** 2) - r * a ** 2,
                 dynamics=lambda s, a: A * s + B * a, sigma=sigma, interpolation=int(interpolation))


def _order(x):
    return x in (1, 3)


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
    "kink": (kink, {"A": (_any, "a number"), "B": (_any, "a number"), "q": (_nonneg, ">= 0"), "r": (_pos, "> 0"),
                    "c": (_nonneg, ">= 0"), "sigma": (_nonneg, ">= 0 (0: deterministic)"),
                    "interpolation": (_order, "1 or 3")}),
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


#: Magnitudes of built-in model parameters: at most :data:`MAX_PARAM`, and at least :data:`MIN_POSITIVE` for the
#: parameters that must be > 0 (scales such as ``sigma`` and ``width`` are divided by: ``sigma = 1e-300`` would
#: divide by zero, ``A = 1e308`` overflow the dynamics).
MAX_PARAM = 1e12
MIN_POSITIVE = 1e-12


def _in_range(x, positive: bool) -> bool:
    magnitude = np.abs(np.asarray(x, dtype=float))
    return bool(np.all(magnitude <= MAX_PARAM) and (not positive or np.all(magnitude >= MIN_POSITIVE)))


def _parameter(model: str, key: str, value, check: Callable, what: str):
    """Validate one builtin parameter: a float, or an array of an allowed shape (:data:`ARRAY_PARAMS`)."""
    shapes = ARRAY_PARAMS.get(model, {}).get(key, ())
    positive = check is _pos
    scale = f"in [{MIN_POSITIVE:g}, {MAX_PARAM:g}]" if positive else f"at most {MAX_PARAM:g} in magnitude"
    if what == "a number":
        allowed = f"must be a number{_describe(shapes)} and finite, {scale}"
    else:
        allowed = f"must be {what}{f' (a number{_describe(shapes)})' if shapes else ''} and finite, {scale}"
    if isinstance(value, (list, tuple)) and shapes:
        try:
            array = np.asarray(value, dtype=float)
        except (TypeError, ValueError):  # ragged or non-numeric
            raise ConfigError(f"mdp.params.{key}: {allowed} (got {value!r})") from None
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                      for v in np.asarray(value, dtype=object).ravel())
        if not (numbers and array.shape in shapes and np.all(np.isfinite(array)) and np.all(check(array))
                and _in_range(array, positive)):
            raise ConfigError(f"mdp.params.{key}: {allowed} (got {value!r})")
        return array
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not check(value) or not _in_range(value, positive):
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
                                  f"(allowed: {', '.join(allowed)}){_suggest(key, allowed)}")
            values[key] = _parameter(name, key, value, *allowed[key])
        return factory(**values)
    if not _USER_MODEL.match(name):
        raise ConfigError(f"mdp.model: unknown model {name!r} (allowed: {', '.join(BUILTIN)}, or "
                          f"'package.module:function' registered with @solver.models.model){_suggest(name, BUILTIN)}")
    module_name, func_name = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"mdp.model: cannot import module {module_name!r} ({_one_line(exc)})") from None
    except (Exception, SystemExit) as exc:  # the module's own code failed (syntax error, an exception at import)
        raise ConfigError(f"mdp.model: importing {module_name!r} failed ({_reason(exc)})") from None
    factory = vars(module).get(func_name)  # the namespace only: no module __getattr__ runs
    if factory is None:
        raise ConfigError(f"mdp.model: module {module_name!r} has no function {func_name!r}")
    if not is_registered(factory):
        raise ConfigError(f"mdp.model: {name} is not a registered wpgflow model (only functions decorated with "
                          "@solver.models.model may be named in a config); it was not called")
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            built = factory(**params)
    except TypeError as exc:
        raise ConfigError(f"mdp.params: rejected by {name} ({_one_line(exc)})") from None
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"mdp.model: {name} raised {_reason(exc)}") from None
    if not isinstance(built, Model):
        raise ConfigError(f"mdp.model: {name} must return solver.models.Model, got {type(model).__name__}")
    dims = (built.action_dim, built.state_dim)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d in (1, 2) for d in dims):
        raise ConfigError(f"mdp.model: {name} must have action_dim and state_dim 1 or 2 "
                          f"(got {built.action_dim!r}, {built.state_dim!r})")
    if not callable(built.reward) or not (built.dynamics is None or callable(built.dynamics)):
        raise ConfigError(f"mdp.model: {name} must have a callable reward and dynamics (or dynamics None)")
    sigma = built.sigma
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating, np.integer)):
        raise ConfigError(f"mdp.model: {name} has sigma {sigma!r}; it must be a number")
    if built.dynamics is not None and not (math.isfinite(sigma) and (sigma == 0 or MIN_POSITIVE <= sigma <= MAX_PARAM)):
        raise ConfigError(f"mdp.model: {name} has dynamics, so its sigma must be finite and in "
                          f"[{MIN_POSITIVE:g}, {MAX_PARAM:g}] (got {sigma!r})")
    return built


def check_outputs(model: Model, name: str, s: np.ndarray, a: np.ndarray) -> None:
    """Evaluate ``reward`` and ``dynamics`` once on the grid and refuse what the MDP cannot use.

    ``s`` and ``a`` are the arrays :func:`solver.mdp.build_mdp` passes (``(N, 1)`` or ``(N, 1, 2)``; ``(1, M)`` or
    ``(1, M, 2)``). The reward must broadcast to ``(N, M)``, the dynamics to ``(N, M)`` (1D state) or
    ``(N, M, 2)`` (2D state), both real numbers and finite.

    Raises:
        ConfigError: naming ``mdp.model`` (a user model) or ``mdp.params`` (a built-in one) and the reason.
    """
    key = "mdp.params" if name in BUILTIN else "mdp.model"
    n, m = s.shape[0], a.shape[1]
    wanted = {"reward": (n, m), "dynamics": (n, m) if model.state_dim == 1 else (n, m, 2)}
    for what, fn in (("reward", model.reward), ("dynamics", model.dynamics)):
        if fn is None:
            continue
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                values = np.asarray(fn(s, a))
        except (Exception, SystemExit) as exc:
            raise ConfigError(f"mdp.model: the {what} of {name} raised {_reason(exc)}") from None
        if values.dtype.kind not in "biuf":
            raise ConfigError(f"mdp.model: the {what} of {name} must return real numbers (got dtype {values.dtype})")
        try:
            np.broadcast_shapes(values.shape, wanted[what])
            fits = np.broadcast_shapes(values.shape, wanted[what]) == wanted[what]
        except ValueError:
            fits = False
        if not fits:
            raise ConfigError(f"mdp.model: the {what} of {name} has shape {values.shape}; it must broadcast to "
                              f"{wanted[what]} (states x actions{' x 2' if len(wanted[what]) == 3 else ''})")
        if not np.all(np.isfinite(values)):
            raise ConfigError(f"{key}: the {what} of {name!r} is not finite (NaN or infinite) on the state/action "
                              "grid" + ("; lower the parameters' magnitudes" if key == "mdp.params" else ""))


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    message = _one_line(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _suggest(name: str, allowed) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(allowed), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
