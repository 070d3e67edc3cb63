"""A user-defined model for the CLI tests, loaded by name as ``tests.user_model:quadratic``."""

from solver.models import Model


def quadratic(k=1.0):
    return Model(reward=lambda s, a: -k * (a - 0.2 * s) ** 2 - s ** 2, dynamics=lambda s, a: 0.5 * s + 0.3 * a,
                 sigma=0.3)


def not_a_model():
    return 42
