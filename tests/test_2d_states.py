"""2D state grids: the 2D-state LQR closed form, the discrete optimum against it, and the flow's structure."""

import math

import numpy as np
import pytest

from solver import bellman, flows, oracles
from solver.flows import fokker_planck
from solver.fem import rectangle_space
from solver.mdp import build_mdp, product_grid
from solver.models import lqr

from .conftest import random_policy

#: A coupled 2D-state LQR: neither A nor B is diagonal, so V* does not split into scalar problems.
COUPLED = {"A": [[0.9, 0.1], [-0.1, 0.8]], "B": [[0.5, 0.2], [0.0, 0.7]], "q": 1.0, "r": [0.5, 1.0], "sigma": 0.5}


def grid(lower: float, upper: float, n: int) -> np.ndarray:
    """``(n^2, 2)`` row-major grid states on ``[lower, upper]^2``."""
    x = np.linspace(lower, upper, n)
    return product_grid(x, x)


@pytest.mark.parametrize("std", [None, 1.5])
def test_state2_oracle_splits_into_scalar_ones_for_diagonal_dynamics(std):
    """Diagonal A, B, R: two independent scalar LQRs (theory.md §7.1 per axis), V* = V*_1(s_1) + V*_2(s_2)."""
    tau, gamma, sigma = 0.5, 0.9, 0.4
    two = oracles.lqr_state2_optimum(np.diag([0.9, 0.8]), np.diag([0.5, 0.7]), 1.0, [0.5, 1.0], sigma, gamma, tau,
                                     std)
    axes = [oracles.lqr_optimum(a, b, 1.0, r, sigma, gamma, tau, std) for a, b, r in ((0.9, 0.5, 0.5),
                                                                                       (0.8, 0.7, 1.0))]
    # the DARE solver (Schur method) and the scalar quadratic formula agree to round-off
    np.testing.assert_allclose(two.P, np.diag([x.P for x in axes]), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(two.K, np.diag([x.K for x in axes]), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(two.Sigma, np.diag([x.Sigma for x in axes]), rtol=1e-12, atol=1e-14)
    assert two.c == pytest.approx(sum(x.c for x in axes), rel=1e-12)
    s = np.array([[0.3, -1.2], [2.0, 0.5]])
    np.testing.assert_allclose(two.value(s), axes[0].value(s[:, 0]) + axes[1].value(s[:, 1]), rtol=1e-12)
    assert two.wpg_rate() == pytest.approx(4 * min(x.alpha for x in axes), rel=1e-12)


@pytest.mark.parametrize("std", [None, 1.0])
def test_state2_oracle_is_a_fixed_point_of_the_soft_bellman_operator(std):
    """``V*(s) = tau log int exp(Q*(s, a) / tau) d mu(a)`` for the coupled model, by brute-force quadrature.

    ``E V*(s')`` of the quadratic ansatz is exact; the action integral is a trapezoid rule on [-8, 8]^2 with
    h = 0.04, exponentially accurate for the Gaussian integrand (std >= 0.3 >> h), so only round-off remains.
    """
    tau, gamma = 0.5, 0.9
    p = COUPLED
    exact = oracles.lqr_state2_optimum(p["A"], p["B"], p["q"], p["r"], p["sigma"], gamma, tau, std)
    A, B, R = np.array(p["A"]), np.array(p["B"]), np.diag(p["r"])
    x = np.linspace(-8, 8, 401)
    a = product_grid(x, x)
    h2 = (x[1] - x[0]) ** 2
    log_mu = 0.0 if std is None else -np.sum(a ** 2, axis=1) / (2 * std ** 2) - math.log(2 * math.pi * std ** 2)
    for s in ([0.0, 0.0], [1.5, -0.7], [-2.0, 2.0]):
        s = np.array(s)
        mean_next = s @ A.T + a @ B.T
        expected_v = exact.value(mean_next) - p["sigma"] ** 2 * np.trace(exact.P)
        Q = -(p["q"] * s @ s + np.einsum("mi,ij,mj->m", a, R, a)) + gamma * expected_v
        z = Q / tau + log_mu
        soft = tau * (z.max() + math.log(np.exp(z - z.max()).sum() * h2))
        assert soft == pytest.approx(float(exact.value(s)), abs=1e-10)
        gibbs = np.exp(z - z.max())
        gibbs /= gibbs.sum()
        np.testing.assert_allclose(gibbs @ a, exact.mean(s), atol=1e-10)


@pytest.fixture(scope="module", params=[("lebesgue", None), ("gaussian", 1.0)], ids=["lebesgue", "gaussian"])
def coupled_optimum(request):
    """21 x 21 states on [-5, 5]^2 (h_s = sigma), actions [-5, 5]^2 with 24 x 24 crossed cells (1201 DOFs)."""
    reference, std = request.param
    states = grid(-5.0, 5.0, 21)
    space = rectangle_space((-5.0, -5.0), (5.0, 5.0), (24, 24))
    mdp = build_mdp(lqr(**COUPLED), states, space, 0.9, 0.5, reference, std or 1.0)
    exact = oracles.lqr_state2_optimum(**COUPLED, gamma=0.9, tau=0.5, reference_std=std)
    return mdp, bellman.soft_policy_iteration(mdp), exact


def test_2d_state_lqr_optimum_matches_closed_form(coupled_optimum):
    """V*, policy mean and covariance at the interior states ``max(|s_1|, |s_2|) <= 2``.

    There the optimal Gaussians (std <= 0.54, mean |K s| <= 1.9) keep > 5 std inside the action square and the
    state kernel's window; the errors are quadrature errors of the crossed mesh (h = 5/12), measured 2.5e-8 (V*),
    8e-8 (mean) and 1.8e-7 (covariance) with the Lebesgue reference. The issue's bar is 1e-5.
    """
    mdp, opt, exact = coupled_optimum
    states = mdp.states
    inner = np.abs(states).max(axis=1) <= 2.0
    masses = opt.p * mdp.weights
    mean = masses @ mdp.space.coords
    centred = mdp.space.coords[None] - mean[:, None]
    cov = np.einsum("ij,ijk,ijl->ikl", masses, centred, centred)
    assert inner.sum() == 81
    assert np.abs(opt.V - exact.value(states))[inner].max() < 1e-5
    assert np.abs(mean - exact.mean(states))[inner].max() < 1e-5
    assert np.abs(cov - exact.Sigma)[inner].max() < 1e-5


def test_2d_state_bellman_identity(coupled_optimum):
    """The discrete optimum is a fixed point of the discrete soft Bellman operator (to SPI's tolerance)."""
    mdp, opt, _ = coupled_optimum
    ev = bellman.evaluate(mdp, opt.p)
    np.testing.assert_allclose(ev.V, opt.V, rtol=0, atol=1e-9 * np.abs(opt.V).max())
    assert np.max(np.abs(flows.potential(mdp, ev.Q) - flows.potential(mdp, opt.Q))) < 1e-8


@pytest.fixture(scope="module")
def small_grid_mdp():
    """9 x 9 states x 145 action DOFs: every step is cheap, the structure is the same as at full size."""
    space = rectangle_space((-3.0, -3.0), (3.0, 3.0), (8, 8))
    return build_mdp(lqr(**COUPLED), grid(-3.0, 3.0, 9), space, 0.9, 0.05)


@pytest.mark.parametrize("dt", [0.01, 5.0])
def test_2d_state_flow_conserves_mass_positivity_and_monotone_values(small_grid_mdp, dt):
    """theory.md §3 on a 2D state grid: mass to round-off, p >= 0 and V^{pi_n} non-decreasing at every state."""
    mdp = small_grid_mdp
    values = []
    for state in flows.states("wasserstein", mdp, random_policy(mdp, 7), dt=dt, t_end=10 * dt):
        values.append(state.evaluation.V)
        assert np.max(np.abs(state.p @ mdp.weights - 1)) < 1e-13
        assert state.p.min() >= 0
    assert len(values) == 11
    assert np.diff(np.array(values), axis=0).min() > -1e-12 * np.abs(values[0]).max()


def test_2d_state_gibbs_optimum_is_a_fixed_point(small_grid_mdp):
    mdp = small_grid_mdp
    opt = bellman.soft_policy_iteration(mdp)
    masses = opt.p * mdp.weights
    new = fokker_planck.implicit_step(mdp.space, masses, flows.potential(mdp, opt.Q), mdp.tau, 5.0)
    assert np.max(np.abs(new - masses)) < 1e-13  # round-off of one sparse solve per state
