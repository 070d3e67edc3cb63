"""User-defined models for the CLI tests, loaded by name as ``tests.user_model:quadratic`` etc.

Only factories decorated with :func:`solver.models.model` may be named in a config; the undecorated ones below
(and the broken ones) exercise the refusals of ``tests/test_robustness.py``.
"""

import math

import numpy as np

from solver.models import Model, model


@model
def quadratic(k=1.0):
    return Model(reward=lambda s, a: -k * (a - 0.2 * s) ** 2 - s ** 2, dynamics=lambda s, a: 0.5 * s + 0.3 * a,
                 sigma=0.3)


@model
def not_a_model():
    return 42


@model
def plane_state(k=1.0):
    """A 2D state steered by a 1D action: ``s' = 0.5 s + a (0.3, 0.2) + 0.3 xi``."""
    return Model(reward=lambda s, a: -k * (a - 0.2 * s[..., 0]) ** 2 - (s ** 2).sum(axis=-1),
                 dynamics=lambda s, a: 0.5 * s + a[..., None] * np.array([0.3, 0.2]), sigma=0.3, state_dim=2)


def unregistered(k=1.0):
    """A valid model factory, but not decorated: a config may not call it."""
    return quadratic(k)


@model
def raises_value_error(k=1.0):
    raise ValueError("k must be small")


@model
def raises_runtime_error():
    raise RuntimeError("cannot build")


def _with(reward=None, dynamics=None, sigma=0.3, **kw):
    return Model(reward=reward or (lambda s, a: -a ** 2 - s ** 2), dynamics=dynamics or (lambda s, a: 0.5 * s + a),
                 sigma=sigma, **kw)


@model
def reward_wrong_shape():
    return _with(reward=lambda s, a: np.zeros(7))


@model
def reward_string():
    return _with(reward=lambda s, a: "high")


@model
def reward_raises():
    return _with(reward=lambda s, a: 1 / 0)


@model
def reward_nan():
    return _with(reward=lambda s, a: np.full(np.broadcast_shapes(s.shape, a.shape), np.nan))


@model
def reward_inf():
    return _with(reward=lambda s, a: -np.inf * a ** 2 - 1.0)


@model
def dynamics_wrong_shape():
    return _with(dynamics=lambda s, a: np.zeros((3, 3, 3)))


@model
def dynamics_raises():
    return _with(dynamics=lambda s, a: s[5, 5, 5])


@model
def dynamics_nan():
    return _with(dynamics=lambda s, a: s + a * math.nan)


@model
def sigma_inf():
    return _with(sigma=math.inf)


@model
def sigma_string():
    return _with(sigma="0.3")


@model
def bad_dims():
    return _with(action_dim=3)


@model
def exits():
    raise SystemExit(3)
