"""User-defined models for the CLI tests, loaded by name as ``tests.user_model:quadratic`` etc."""

import numpy as np

from solver.models import Model


def quadratic(k=1.0):
    return Model(reward=lambda s, a: -k * (a - 0.2 * s) ** 2 - s ** 2, dynamics=lambda s, a: 0.5 * s + 0.3 * a,
                 sigma=0.3)


def not_a_model():
    return 42


def plane_state(k=1.0):
    """A 2D state steered by a 1D action: ``s' = 0.5 s + a (0.3, 0.2) + 0.3 xi``."""
    return Model(reward=lambda s, a: -k * (a - 0.2 * s[..., 0]) ** 2 - (s ** 2).sum(axis=-1),
                 dynamics=lambda s, a: 0.5 * s + a[..., None] * np.array([0.3, 0.2]), sigma=0.3, state_dim=2)
