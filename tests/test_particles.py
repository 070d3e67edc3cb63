"""Reflected Langevin particles (theory.md §3 particle picture, §8.8) against the FEM density of the same flow."""

import math

import numpy as np
import pytest

from solver import bellman, flows
from solver.flows import particles
from solver.fem import ActionSpace, interval_space
from solver.mdp import build_mdp
from solver.models import bandit, lqr

N_PARTICLES = np.array([100, 200, 400, 800, 1600, 3200, 6400])
SEEDS = range(8)


def last(iterator):
    for item in iterator:
        pass
    return item


def cdf_distance(mdp, p, q):
    """Mean over states of the sup over DOFs of the difference of the cumulative DOF masses (a KS distance)."""
    return float(np.mean(np.max(np.abs(np.cumsum((p - q) * mdp.weights, axis=1)), axis=1)))


def gaussian_start(mdp, mean, std):
    a = mdp.space.coords[:, 0]
    p = np.tile(np.exp(-0.5 * ((a - mean) / std) ** 2), (mdp.n_states, 1))
    return p / (p @ mdp.weights)[:, None]


def error_slope(mdp, p0, t_end, dt):
    """RMS over seeds of the particle-vs-FEM distance at t_end for each N, and the fitted log-log slope."""
    reference = last(flows.states("wasserstein", mdp, p0, dt=1e-3, t_end=t_end)).p
    errors = np.array([math.sqrt(np.mean([cdf_distance(mdp, last(flows.states(
        "particles", mdp, p0, t_end, dt=dt, particles=int(n), seed=seed)).p, reference) ** 2 for seed in SEEDS]))
        for n in N_PARTICLES])
    return errors, np.polyfit(np.log(N_PARTICLES), np.log(errors), 1)[0]


# Why -0.5 +- 0.15: the sup-CDF error of N samples is ~0.87 / sqrt(N) with ~35% relative scatter per seed; the
# RMS over 8 seeds scatters by ~10%, so the slope fitted over 7 points spanning ln 64 has a standard error ~0.03
# and 0.15 is ~5 of them (four disjoint blocks of 8 seeds: OU -0.57, -0.51, -0.50, -0.55; MDP -0.51, -0.49,
# -0.50, with errors 0.069 ... 0.0088 from N = 100 to 6400). The biases (Euler-Maruyama O(dt) at dt = 5e-3, the
# FEM reference's O(dt + h^2), cloud-in-cell O(h^2)) were measured with 4e5 particles at <= 2e-3, below a fifth
# of the smallest sampling error (~9e-3 at N = 6400), so they move the slope by < 0.01. No particle comes near
# the action boundary (density there < 1e-10), so the O(sqrt(dt)) weak error of reflected Euler-Maruyama
# (theory.md §8.8) does not enter.


def test_particles_match_the_ou_fem_density_at_rate_n_to_minus_half():
    """One state (theory.md §7.3): Q does not depend on pi, the particles are independent OU processes."""
    mdp = build_mdp(bandit(k=1.0, center=0.5), np.array([0.0]), interval_space(-6, 6, 256), 0.9, 0.5)
    errors, slope = error_slope(mdp, gaussian_start(mdp, -0.5, 0.5), 0.25, 5e-3)
    assert slope == pytest.approx(-0.5, abs=0.15)
    assert errors[-1] < 0.015  # ~0.87 / sqrt(6400) = 0.011 from sampling alone


def test_particles_match_the_mdp_fem_density_at_rate_n_to_minus_half():
    """A 5-state LQR (h_s = 0.5 = sigma/2): the drift grad_a Q^{pi_t} comes from the particles' own density.

    sigma = 1 keeps a -> Q(s, a) smooth; with h_s >> sigma the grid kernel makes Q a steep staircase in a and
    Euler-Maruyama at dt = 5e-3 leaves a bias of ~7e-3 (measured), which would flatten the slope.
    """
    mdp = build_mdp(lqr(sigma=1.0), np.linspace(-1, 1, 5), interval_space(-5, 5, 128), 0.9, 0.5)
    errors, slope = error_slope(mdp, gaussian_start(mdp, 1.0, 0.5), 0.25, 5e-3)
    assert slope == pytest.approx(-0.5, abs=0.15)
    assert errors[-1] < 0.015


# --- the pieces ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def space():
    return interval_space(-1.0, 2.0, 30)


def test_samples_follow_the_p1_density(space):
    """Inverse-CDF sampling: the empirical CDF at the nodes matches the trapezoid CDF of the P1 density."""
    a = space.coords[:, 0]
    p = np.vstack([np.exp(-3 * (a - 0.5) ** 2), np.where(a < 0.3, 0.0, 1.0 + a)])  # smooth, and zero on a part
    p /= (p @ space.weights)[:, None]
    n = 200_000
    x = particles.sample(space, p, n, np.random.default_rng(1))
    assert x.min() >= a[0] and x.max() <= a[-1]
    assert np.all(x[1] >= a[np.argmax(a >= 0.3) - 1])  # no particle where the density vanishes
    exact = np.concatenate([np.zeros((2, 1)), np.cumsum(0.5 * np.diff(a) * (p[:, 1:] + p[:, :-1]), axis=1)], axis=1)
    empirical = np.mean(x[:, :, None] <= a[None, None, :], axis=1)
    assert np.max(np.abs(empirical - exact)) < 1.63 / math.sqrt(n)  # KS 99% quantile


def test_deposit_conserves_mass_and_reproduces_linear_functions(space):
    """Cloud-in-cell: masses are the P1 hat functions at the particles, so sum_j m_j = 1 and
    sum_j m_j a_j = mean of the positions (P1 reproduces linear functions) exactly."""
    x = np.random.default_rng(2).uniform(-1.0, 2.0, size=(3, 1000))
    p = particles.deposit(space, x)
    assert p.min() >= 0
    np.testing.assert_allclose(p @ space.weights, 1.0, rtol=1e-14)
    np.testing.assert_allclose((p * space.weights) @ space.coords[:, 0], x.mean(axis=1), rtol=1e-13)


def test_reflection_folds_into_the_interval():
    """Mirror at -1 and 2 as often as needed: 5.2 -> 2 - 3.2 = -1.2 -> -0.8; -4.1 -> 2.1 -> 1.9."""
    a = np.array([-1.5, -1.0, 0.3, 2.0, 2.4, 5.2, -4.1])
    np.testing.assert_allclose(particles.reflect(a, -1.0, 2.0), [-0.5, -1.0, 0.3, 2.0, 1.6, -0.8, 1.9], atol=1e-14)


def test_reflected_brownian_motion_keeps_the_uniform_law():
    """Flat reward: the particles are reflected Brownian motions, whose invariant law is uniform (no-flux
    boundary). Clipping instead of reflecting would pile ~sqrt(tau dt) of mass per step at the ends."""
    mdp = build_mdp(bandit(k=0.0), np.array([0.0]), interval_space(0, 1, 20), 0.5, 0.5)
    n = 20_000
    final = last(flows.states("particles", mdp, bellman.uniform_policy(mdp), 1.0, dt=0.01, particles=n, seed=3))
    assert cdf_distance(mdp, final.p, bellman.uniform_policy(mdp)) < 1.63 / math.sqrt(n)  # KS 99% quantile
    np.testing.assert_allclose(final.p @ mdp.weights, 1.0, rtol=1e-14)


def test_runs_are_reproducible_and_seeds_differ():
    mdp = build_mdp(bandit(k=1.0), np.array([0.0]), interval_space(-3, 3, 30), 0.9, 0.5)
    p0 = bellman.uniform_policy(mdp)
    run = [last(flows.states("particles", mdp, p0, 0.1, dt=0.01, particles=500, seed=seed)).p for seed in (0, 0, 1)]
    assert np.array_equal(run[0], run[1]) and not np.array_equal(run[0], run[2])


def test_two_dimensional_actions_are_refused():
    from solver.fem import rectangle_space
    mdp = build_mdp(bandit(k=1.0, center=(0.0, 0.0)), np.array([0.0]), rectangle_space((0, 0), (1, 1), (2, 2)),
                    0.9, 0.5)
    with pytest.raises(ValueError, match="1D action interval"):
        next(flows.states("particles", mdp, bellman.uniform_policy(mdp), dt=0.01))


@pytest.mark.parametrize("nodes", [np.linspace(-1.0, 2.0, 31), np.array([-1.0, -0.7, -0.1, 0.0, 0.8, 1.1, 2.0])])
def test_locate_on_uniform_and_graded_meshes(nodes):
    """Arithmetic cell search on uniform meshes, binary search otherwise: both give x_j <= a <= x_{j+1}."""
    h = np.diff(nodes)
    weights = np.concatenate([[h[0] / 2], (h[:-1] + h[1:]) / 2, [h[-1] / 2]])
    chain = np.stack([np.arange(h.size), np.arange(1, h.size + 1)], axis=1)
    space = ActionSpace(coords=nodes[:, None], weights=weights, edges=chain, conductance=1.0 / h, cells=chain,
                        bandwidth=1)
    a = np.stack([np.random.default_rng(4).uniform(-1.0, 2.0, size=nodes.size), nodes])  # random, and the nodes
    cell, theta = particles.locate(space, a)
    assert np.all((nodes[cell] <= a) & (a <= nodes[cell + 1]))
    np.testing.assert_allclose(nodes[cell] + theta * h[cell], a, rtol=0, atol=1e-14)
