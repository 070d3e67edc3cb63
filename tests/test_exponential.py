"""The exponential integrator of the Wasserstein flow (``flow.integrator = "exponential"``, theory.md §3, §5.3(e)).

Independent truths: ``scipy.linalg.expm`` of the frozen generator, the exact OU Gaussian of theory.md §7.3, the
smallest generator gap ``ell_min`` at ``Q*`` (a separate eigen-solve, :func:`solver.diagnostics.generator_gaps`),
and the structural identities of the scheme (mass, positivity, Gibbs fixed point, monotone ``V``).
"""

import math

import numpy as np
import pytest
import scipy.linalg as sla

from solver import bellman, diagnostics, flows, oracles
from solver.config import ConfigError, flow_config
from solver.fem import interval_space, rectangle_space
from solver.flows import fokker_planck as fp
from solver.mdp import build_mdp
from solver.models import bandit, double_well, lqr
from solver.parallel import Partition

from .conftest import LQR_PARAMS, random_policy

OU = {"k": 1.0, "center": 0.5, "tau": 0.5, "m0": -0.5, "v0": 0.25}


def take(iterator, n):
    for i, item in enumerate(iterator):
        yield item
        if i + 1 == n:
            return


def gaussian(a, mean, var):
    return np.exp(-0.5 * (a - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


def ou_problem(cells=128):
    """experiments/bandit_ou.toml on a coarser mesh: [-6, 6] keeps 7.8 standard deviations inside."""
    space = interval_space(-6.0, 6.0, cells)
    mdp = build_mdp(bandit(k=OU["k"], center=OU["center"]), np.array([0.0]), space, 0.9, OU["tau"])
    a = space.coords[:, 0]
    p0 = gaussian(a, OU["m0"], OU["v0"])[None, :]
    return mdp, p0 / (p0 @ mdp.weights)[:, None]


def ou_l1(mdp, p, t):
    a = mdp.space.coords[:, 0]
    mean, var = oracles.ou_moments(t, OU["k"], OU["center"], OU["tau"], OU["m0"], OU["v0"])
    return float(np.abs(p[0] - gaussian(a, mean, var)) @ mdp.weights)


def final(mdp, p0, t_end, **options):
    for state in flows.states("wasserstein", mdp, p0, t_end, integrator="exponential", **options):
        pass
    return state


# --- the propagator against expm ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", fp.SCHEMES)
@pytest.mark.parametrize("dt", [1e-3, 0.3, 5.0])
def test_uniformised_step_is_expm_of_the_generator(small_well, scheme, dt):
    """exp(dt L) m by uniformisation equals scipy's expm (Pade) of the assembled generator, state by state."""
    p = random_policy(small_well, 2)
    g = flows.potential(small_well, bellman.evaluate(small_well, p).Q)
    masses = p * small_well.weights
    new = fp.exponential_step(small_well.space, masses, g, small_well.tau, dt, scheme)
    for s in (0, 13, 26):
        L = fp.generator(small_well.space, g[s], small_well.tau, scheme).toarray()
        exact = sla.expm(dt * L) @ masses[s]
        # expm's scaling and squaring loses ~2^s eps (s ~ log2 ||dt L|| = 12 squarings at dt = 5): measured
        # 1.4e-13 of the largest mass at dt = 5, 1e-16 at dt = 1e-3
        np.testing.assert_allclose(new[s], exact, rtol=0, atol=1e-12 * exact.max())
    assert new.min() >= 0


@pytest.mark.parametrize("dt", [0.01, 1.0, 5.0])
def test_series_mass_drift_is_round_off(small_well, dt):
    """Without the final rescaling, the series' mass drifts by the round-off of B's column sums, once per
    product: bounded by lam dt eps (measured ~0.1 lam dt eps), which the rescaling then removes."""
    p = random_policy(small_well, 4)
    g = flows.potential(small_well, bellman.evaluate(small_well, p).Q)
    masses = p * small_well.weights
    gen = fp.uniformise(small_well.space, g, small_well.tau)
    raw = fp.apply_uniformised(gen, masses, dt, rescale=False)
    drift = np.abs(raw.sum(axis=1) - masses.sum(axis=1))
    assert np.all(drift <= (gen.lam * dt + 10) * np.finfo(float).eps)
    rescaled = fp.apply_uniformised(gen, masses, dt)
    assert np.max(np.abs(rescaled.sum(axis=1) - masses.sum(axis=1))) < 1e-15  # a few ulps of a sum of 41 terms
    np.testing.assert_allclose(rescaled, raw, rtol=(gen.lam * dt + 10) * np.finfo(float).eps, atol=0)


def test_uniformised_step_on_a_2d_mesh_is_expm():
    """General edge lists (2D action mesh): the scatter path, against expm of the assembled generator."""
    space = rectangle_space((-1.0, -1.0), (1.0, 1.0), (6, 6))
    rng = np.random.default_rng(3)
    g = rng.normal(size=(2, space.n_dofs))
    masses = rng.uniform(0.1, 1.0, size=(2, space.n_dofs)) * space.weights
    new = fp.exponential_step(space, masses, g, 0.4, 0.7)
    for s in range(2):
        exact = sla.expm(0.7 * fp.generator(space, g[s], 0.4).toarray()) @ masses[s]
        np.testing.assert_allclose(new[s], exact, rtol=0, atol=1e-14 * exact.max())  # round-off of ~100 terms


def test_poisson_weights_sum_to_one():
    """Means from 0 to MAX_POISSON_MEAN: rows sum to one, entries >= 0, and equal scipy's Poisson pmf."""
    from scipy.stats import poisson

    mean = np.array([0.0, 1e-3, 3.0, 70.0, fp.MAX_POISSON_MEAN])
    w = fp.poisson_weights(mean)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-14)  # ~K additions of round-off
    assert w.min() >= 0
    k = np.arange(w.shape[1])
    # both from logarithms: relative error ~ mean * eps = 5e-14 at 500
    np.testing.assert_allclose(w, poisson.pmf(k[None, :], mean[:, None]), rtol=1e-11, atol=1e-300)


# --- exact in time on one state (theory.md §7.3) -----------------------------------------------------------


def test_bandit_error_does_not_depend_on_dt_and_is_the_semi_discrete_error():
    """One state: Q is frozen, so exp(dt L) steps compose exactly; the error against the exact OU Gaussian is
    the spatial error of the semi-discrete ODE alone, whatever dt."""
    mdp, p0 = ou_problem()
    g = flows.potential(mdp, bellman.evaluate(mdp, p0).Q)[0]
    L = fp.generator(mdp.space, g, mdp.tau).toarray()
    semi = ((sla.expm(1.0 * L) @ (p0[0] * mdp.weights)) / mdp.weights)[None, :]
    semi_error = ou_l1(mdp, semi, 1.0)
    errors = {dt: ou_l1(mdp, final(mdp, p0, 1.0, dt=dt).p, 1.0) for dt in (0.5, 0.001)}
    assert errors[0.5] == pytest.approx(errors[0.001], rel=0.01)  # the bar (measured: 1e-11 relative)
    for error in errors.values():
        # the same error as the semi-discrete solution: the densities agree to ~1e-13 (1000 steps of round-off)
        assert error == pytest.approx(semi_error, rel=1e-8)
    assert 1e-4 < semi_error < 3e-3  # O(h^2) of 128 cells (measured 1.35e-3): the test is not vacuous


def test_bandit_generator_is_built_once():
    """A one-state run uniformises its generator once and reuses it for every step (a frozen Q)."""
    mdp, p0 = ou_problem(32)
    flow = flows.make("wasserstein", mdp, dt=0.1, integrator="exponential")
    states = list(take(flows.trajectory(flow, p0, 1.0), 4))
    frozen = flow._frozen
    assert frozen is not None
    states.extend(take(flows.trajectory(flow, states[-1].p, 1.0), 2))  # a restart builds it anew
    assert flow._frozen is not frozen
    frozen = flow._frozen
    for _ in take(flows.trajectory(flow, p0, 1.0), 5):
        pass
    assert flow._frozen is not frozen and flow._frozen.gen.lam == pytest.approx(frozen.gen.lam, rel=1e-14)


# --- structure for every dt ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", fp.SCHEMES)
@pytest.mark.parametrize("dt", [1e-3, 0.5, 5.0])
def test_gibbs_optimum_is_an_exact_fixed_point(small_well, scheme, dt):
    opt = bellman.soft_policy_iteration(small_well)
    masses = opt.p * small_well.weights
    new = fp.exponential_step(small_well.space, masses, flows.potential(small_well, opt.Q), small_well.tau, dt,
                              scheme)
    # round-off of the series: ~(lam dt) products, each exact to ~1e-16 of the masses (max 0.3)
    assert np.max(np.abs(new - masses)) < 1e-13


@pytest.mark.parametrize("scheme", fp.SCHEMES)
@pytest.mark.parametrize("dt", [0.01, 1.0, 5.0])
def test_flow_conserves_mass_positivity_and_monotone_values(small_well, scheme, dt):
    values = []
    steps = 12 if dt <= 1 else 5  # sqra at dt = 5: lam dt ~ 15000 products per step
    for state in take(flows.states("wasserstein", small_well, random_policy(small_well, 4), dt=dt, scheme=scheme,
                                   integrator="exponential"), steps):
        values.append(state.evaluation.V)
        assert np.max(np.abs(state.p @ small_well.weights - 1)) < 1e-13  # round-off of lam dt products
        assert state.p.min() >= 0  # a sum of non-negative products: exact in floating point
    # theory.md §3: V^{pi_n}(s) non-decreasing at every state, for every dt (round-off ~1e-15 |V|)
    assert np.diff(np.array(values), axis=0).min() > -1e-12


@pytest.mark.parametrize("dt", [0.1, 5.0])
def test_small_tau_does_not_overflow(dt):
    """tau = 0.01: exp(g) spans ~hundreds of decades, where the symmetrised eigen route fails; no NaN, structure
    holds, never beyond the optimum."""
    mdp = build_mdp(double_well(B=0.3, depth=0.5), np.linspace(-2, 2, 21), interval_space(-2.5, 2.5, 100), 0.9,
                    0.01)
    J_star = float(mdp.rho @ bellman.soft_policy_iteration(mdp).V)
    a = mdp.space.coords[:, 0]
    p0 = np.tile(np.exp(-0.5 * ((a + 1) / 0.3) ** 2), (mdp.n_states, 1))
    p0 /= (p0 @ mdp.weights)[:, None]
    J = []
    for state in take(flows.states("wasserstein", mdp, p0, dt=dt, integrator="exponential"), 6):
        assert np.all(np.isfinite(state.p)) and state.p.min() >= 0
        assert np.max(np.abs(state.p @ mdp.weights - 1)) < 1e-12
        J.append(float(mdp.rho @ state.evaluation.V))
    assert np.diff(J).min() > -1e-12 * max(map(abs, J))
    assert J_star - max(J) > -1e-12 * abs(J_star)


# --- rate on a coupled MDP (theory.md §5.3(e)) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lqr_small():
    """LQR at tau = 0.1 (every Gibbs policy > 5 std inside [-6, 6], so all states share the slowest mode)."""
    mdp = build_mdp(lqr(**LQR_PARAMS), np.linspace(-6, 6, 41), interval_space(-6, 6, 128), 0.9, 0.1)
    opt = bellman.soft_policy_iteration(mdp)
    return mdp, opt, float(diagnostics.generator_gaps(mdp, opt.Q).min())


@pytest.mark.parametrize("dt", [0.05, 0.5, 1.0])
def test_lqr_rate_is_twice_the_gap_for_every_dt(lqr_small, dt):
    """Near Q* the change of Q is second order in the policy's, so the step linearises to exp(dt L*) and the gap
    decays like exp(-2 ell_min t) whatever dt (implicit Euler: 2 log(1 + dt ell) / dt, 27% slower at dt = 1)."""
    mdp, opt, ell = lqr_small
    J_star = float(mdp.rho @ opt.V)
    t, gap = [], []
    for state in flows.states("wasserstein", mdp, bellman.uniform_policy(mdp), 40.0, dt=dt, integrator="exponential"):
        t.append(state.t)
        gap.append(J_star - float(mdp.rho @ state.evaluation.V))
        if gap[-1] < 1e-11:
            break
    fit = diagnostics.fit_rate(np.array(t), np.array(gap))
    assert fit.window == diagnostics.RATE_WINDOW and fit.points >= 3
    flow = flows.make("wasserstein", mdp, dt=dt, integrator="exponential")
    assert flow.predicted_rate(ell) == 2 * ell
    # 1%: the fit window starts at 1e-5, where the next mode (gap ~ 1.3 ell_min) still adds ~1e-3 to the slope
    assert fit.rate == pytest.approx(2 * ell, rel=0.01)
    exact = oracles.lqr_optimum(**LQR_PARAMS, gamma=0.9, tau=0.1)
    # the discrete gap is O(h^2 / Sigma) below 2 alpha: measured -2.5% at 128 cells, -0.6% at 256
    assert 2 * ell == pytest.approx(exact.wpg_rate(), rel=0.03)


# --- configuration ------------------------------------------------------------------------------------------


def test_config_key_and_refusals(small_well):
    assert flow_config().integrator == "implicit"
    with pytest.raises(ConfigError, match=r"^flow\.integrator: must be one of 'implicit', 'exponential'"):
        flow_config(integrator="rk4")
    with pytest.raises(ConfigError, match=r"^flow\.adaptive: flow\.integrator = \"exponential\" takes fixed steps"):
        flows.make("wasserstein", small_well, Partition(None, small_well.n_states), adaptive=True,
                   integrator="exponential")


def test_frozen_propagator_dense_path_equals_the_series():
    """From the second step of a size on, one-state runs use the dense propagator: same masses as the series."""
    mdp, p0 = ou_problem(64)
    g = flows.potential(mdp, bellman.evaluate(mdp, p0).Q)
    masses = p0 * mdp.weights
    prop = fp.FrozenPropagator(fp.uniformise(mdp.space, g, mdp.tau))
    first = prop.apply(masses, 0.3)  # the series
    second = prop.apply(masses, 0.3)  # the dense E(0.3)
    assert 0.3 in prop._dense and prop._dense[0.3].min() >= 0
    np.testing.assert_allclose(second, first, rtol=0, atol=1e-15)  # round-off of two summation orders
    exact = sla.expm(0.3 * fp.generator(mdp.space, g[0], mdp.tau).toarray()) @ masses[0]
    np.testing.assert_allclose(second[0], exact, rtol=0, atol=1e-14 * exact.max())
