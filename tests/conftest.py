"""Shared fixtures: small discretised problems (DOLFINx meshes are cheap, but build each once)."""

import numpy as np
import pytest

from solver import bellman
from solver.fem import interval_space
from solver.mdp import build_mdp
from solver.models import double_well, lqr

LQR_PARAMS = {"A": 0.9, "B": 0.5, "q": 1.0, "r": 0.5, "sigma": 0.3}


@pytest.fixture(scope="session")
def lqr_mdp():
    """theory.md §7.1 LQR (tau = 1) on the shipped grids: states [-6, 6] x 121, actions [-6, 6] x 256 cells."""
    return build_mdp(lqr(**LQR_PARAMS), np.linspace(-6, 6, 121), interval_space(-6, 6, 256), 0.9, 1.0)


@pytest.fixture(scope="session")
def lqr_optimum(lqr_mdp):
    return bellman.soft_policy_iteration(lqr_mdp)


@pytest.fixture(scope="session")
def small_well():
    """A small double-well MDP with the action moving the state (B != 0), for exact discrete identities."""
    model = double_well(A=0.8, B=0.4, q=1.0, depth=1.0, width=1.0, sigma=0.3)
    return build_mdp(model, np.linspace(-2, 2, 27), interval_space(-2, 2, 40), 0.8, 0.3)


def random_policy(mdp, seed=0):
    """A strictly positive, normalised, non-smooth policy (deterministic seed)."""
    p = np.random.default_rng(seed).uniform(0.1, 2.0, size=(mdp.n_states, mdp.n_actions))
    return p / (p @ mdp.weights)[:, None]
