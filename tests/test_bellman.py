"""Soft Bellman solver against closed forms and exact discrete identities (theory.md §2, §7.1, §7.5)."""

import numpy as np
import pytest

from solver import bellman, oracles
from solver.fem import interval_space, rectangle_space
from solver.mdp import build_mdp, product_grid
from solver.models import double_well, lqr

from .conftest import LQR_PARAMS, random_policy


def test_lqr_optimum_matches_closed_form(lqr_mdp, lqr_optimum):
    exact = oracles.lqr_optimum(**LQR_PARAMS, gamma=0.9, tau=1.0)
    # the reference numbers of theory.md §7.1 (guards the oracle itself against typos)
    assert exact.P == pytest.approx(1.7028101010, abs=1e-9)
    assert exact.c == pytest.approx(4.9657746992, abs=1e-9)
    s = lqr_mdp.states
    interior = np.abs(s) <= 2  # theory.md §8.3: the Gibbs tail mass outside [-6, 6] is <= 1.8e-9 at |s| <= 2
    # Truncating the action domain moves V by ~tau log(1 - eps), eps < 2e-9 at |s| = 2, times 1/(1-gamma);
    # the trapezoid rule is spectrally accurate for these Gaussians. 1e-6 is the bar; we see ~2e-9.
    assert np.max(np.abs(lqr_optimum.V - exact.value(s))[interior]) < 1e-6
    a, w = lqr_mdp.space.coords[:, 0], lqr_mdp.weights
    mean = lqr_optimum.p @ (w * a)
    var = lqr_optimum.p @ (w * a * a) - mean ** 2
    np.testing.assert_allclose(mean[interior], -exact.K * s[interior], atol=1e-6)
    np.testing.assert_allclose(var[interior], exact.Sigma, rtol=1e-6)
    assert lqr_optimum.residual < 1e-10  # V* = T V* to the SPI tolerance


def test_gaussian_reference_matches_closed_form():
    """Gaussian mu = N(0, 1): r -> r + tau/2, and c gets the normalisation term (theory.md §7.1 table)."""
    space = interval_space(-6, 6, 256)
    mdp = build_mdp(lqr(**LQR_PARAMS), np.linspace(-6, 6, 121), space, 0.9, 1.0, "gaussian", 1.0)
    opt = bellman.soft_policy_iteration(mdp)
    exact = oracles.lqr_optimum(**LQR_PARAMS, gamma=0.9, tau=1.0, reference_std=1.0)
    assert exact.P == pytest.approx(2.0084397183, abs=1e-9)
    assert exact.c == pytest.approx(-6.9569336301, abs=1e-9)
    interior = np.abs(mdp.states) <= 2
    assert np.max(np.abs(opt.V - exact.value(mdp.states))[interior]) < 1e-6


def test_bellman_residual_equals_tau_kl_to_gibbs(small_well):
    """theory.md §2 identity 1: T V^pi - V^pi = tau KL(p || G^pi), state by state, to round-off."""
    p = random_policy(small_well)
    ev = bellman.evaluate(small_well, p)
    log_g, tau_log_z = bellman.log_gibbs(small_well, ev.Q)
    residual = bellman.soft_bellman(small_well, ev.V) - ev.V
    np.testing.assert_allclose(tau_log_z, bellman.soft_bellman(small_well, ev.V), rtol=0, atol=1e-12)
    kl = bellman.kl_divergence(small_well, p, log_g)
    assert np.all(kl > 1e-3)  # a non-trivial policy, so the check has teeth
    np.testing.assert_allclose(residual, small_well.tau * kl, rtol=0, atol=1e-12)


def test_performance_difference_lemma(small_well):
    """theory.md §2 identity 2: V' - V = (I - gamma P')^{-1} tau [KL(p || G^pi) - KL(p' || G^pi)]."""
    p, p2 = random_policy(small_well, 1), random_policy(small_well, 2)
    ev, ev2 = bellman.evaluate(small_well, p), bellman.evaluate(small_well, p2)
    log_g, _ = bellman.log_gibbs(small_well, ev.Q)
    source = small_well.tau * (bellman.kl_divergence(small_well, p, log_g)
                               - bellman.kl_divergence(small_well, p2, log_g))
    np.testing.assert_allclose(ev2.V - ev.V, ev2.resolvent.solve(source), rtol=0, atol=1e-11)


def test_soft_policy_iteration_is_monotone_and_converges(small_well):
    p = random_policy(small_well, 3)
    values = []
    for _ in range(8):
        ev = bellman.evaluate(small_well, p)
        values.append(ev.V)
        p = bellman.gibbs(small_well, ev.Q)
    steps = np.diff(np.array(values), axis=0)
    assert steps.min() > -1e-12  # lemma 4: V^{pi_{k+1}} >= V^{pi_k} at every state
    opt = bellman.soft_policy_iteration(small_well)
    assert np.max(np.abs(values[-1] - opt.V)) < 1e-10  # quadratic convergence: 8 iterations suffice


@pytest.mark.parametrize("tau", [0.005, 0.03])
def test_small_tau_is_finite(tau):
    """log-sum-exp and 0 log 0 = 0: tiny temperatures give finite optima, not NaN."""
    space = interval_space(-2, 2, 100)
    mdp = build_mdp(double_well(B=0.3, depth=1.0), np.linspace(-2, 2, 21), space, 0.9, tau)
    opt = bellman.soft_policy_iteration(mdp)
    assert np.all(np.isfinite(opt.V)) and np.all(np.isfinite(opt.p))
    assert opt.residual < 1e-9
    np.testing.assert_allclose(opt.p @ space.weights, 1.0, atol=1e-12)


@pytest.fixture(scope="module")
def grid_2d_mdp():
    """A 2D-state LQR on a 41 x 41 grid (N = 1681 > DENSE_STATES) whose P^pi is dense: GMRES territory."""
    x = np.linspace(-2, 2, 41)
    states = product_grid(x, x)
    model = lqr(A=0.9, B=[[0.5, 0.0], [0.0, 0.5]], sigma=0.2)
    return build_mdp(model, states, rectangle_space((-1.5, -1.5), (1.5, 1.5), (8, 8)), 0.95, 0.5)


def test_resolvent_methods_agree(grid_2d_mdp):
    """Dense LU, SuperLU and GMRES solve (I - gamma P^pi)^{+-T} x = b alike, and "auto" picks by the structure."""
    mdp = grid_2d_mdp
    P = mdp.kernel.policy_matrix(random_policy(mdp) * mdp.weights)
    b = np.random.default_rng(4).normal(size=mdp.n_states)
    solves = {m: bellman.Resolvent(P, mdp.gamma, m) for m in ("dense", "sparse", "krylov")}
    for trans in "NT":
        exact = solves["dense"].solve(b, trans)
        # cond_inf(I - gamma P) <= (1 + gamma)/(1 - gamma) = 39: LU round-off and the GMRES rtol 1e-14 both give
        # relative errors ~1e-13 or less
        for method in ("sparse", "krylov"):
            np.testing.assert_allclose(solves[method].solve(b, trans), exact, rtol=0,
                                       atol=1e-12 * np.abs(exact).max())
    assert bellman.Resolvent(P, mdp.gamma).method == "krylov"  # a 2D grid: the LU would fill in
    # a long 1D grid (2001 states, h = sigma / 5): P^pi is banded, ~190 non-zeros per row
    wide = build_mdp(lqr(**LQR_PARAMS), np.linspace(-60, 60, 2001), interval_space(-6, 6, 32), 0.9, 1.0)
    banded = wide.kernel.policy_matrix(bellman.uniform_policy(wide) * wide.weights)
    assert bellman.Resolvent(banded, 0.9).method == "sparse"


def test_bellman_identity_with_gmres(grid_2d_mdp):
    """theory.md §2 identity 1 on a 2D state grid, where evaluate() solves with GMRES: T V - V = tau KL(p || G)."""
    mdp = grid_2d_mdp
    p = random_policy(mdp, 5)
    ev = bellman.evaluate(mdp, p)
    assert ev.resolvent.method == "krylov"
    kl = bellman.kl_divergence(mdp, p, bellman.log_gibbs(mdp, ev.Q)[0])
    assert np.all(kl > 1e-3)  # a non-trivial policy, so the check has teeth
    # |V| ~ 40 here; GMRES's relative residual 1e-14 times cond <= 39 bounds the error of V by ~2e-11
    np.testing.assert_allclose(bellman.soft_bellman(mdp, ev.V) - ev.V, mdp.tau * kl, rtol=0, atol=1e-10)
