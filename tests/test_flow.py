"""The WPG flow scheme: structure it preserves, accuracy against Ornstein-Uhlenbeck, and rates (theory.md §3, §7)."""

import math

import numpy as np
import pytest
import scipy.linalg as sla

from solver import bellman, diagnostics, flows, oracles
from solver.flows import fokker_planck
from solver.fem import interval_space
from solver.mdp import build_mdp
from solver.models import bandit, double_well, lqr

from .conftest import LQR_PARAMS, random_policy

# --- exact structure (theory.md §7.5) -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", fokker_planck.SCHEMES)
def test_generator_conserves_mass_and_is_in_detailed_balance(small_well, scheme):
    g = flows.potential(small_well, bellman.evaluate(small_well, random_policy(small_well)).Q)[5]
    L = fokker_planck.generator(small_well.space, g, small_well.tau, scheme).toarray()
    np.testing.assert_allclose(L.sum(axis=0), 0.0, atol=1e-12)  # columns sum to zero: mass
    off = L - np.diag(np.diag(L))
    assert off.min() >= 0  # M-matrix: positivity of (I - dt L)^{-1}
    gibbs_masses = np.exp(g - g.max()) * small_well.weights
    flux = L * gibbs_masses[None, :]
    np.testing.assert_allclose(flux, flux.T, rtol=1e-12, atol=1e-15)  # detailed balance w.r.t. w G


@pytest.mark.parametrize("scheme", fokker_planck.SCHEMES)
@pytest.mark.parametrize("dt", [1e-3, 0.5, 5.0])
def test_gibbs_optimum_is_an_exact_fixed_point(small_well, scheme, dt):
    opt = bellman.soft_policy_iteration(small_well)
    masses = opt.p * small_well.weights
    new = fokker_planck.implicit_step(small_well.space, masses, flows.potential(small_well, opt.Q), small_well.tau,
                                      dt, scheme)
    assert np.max(np.abs(new - masses)) < 1e-14  # round-off of one banded solve


@pytest.mark.parametrize("scheme", fokker_planck.SCHEMES)
@pytest.mark.parametrize("dt", [0.01, 1.0, 5.0])
def test_flow_conserves_mass_positivity_and_monotone_values(small_well, scheme, dt):
    p = random_policy(small_well, 4)
    values = []
    for state in _take(flows.states("wasserstein", small_well, p, dt=dt, scheme=scheme), 15):
        values.append(state.evaluation.V)
        assert np.max(np.abs(state.p @ small_well.weights - 1)) < 1e-13
        assert state.p.min() >= 0
    # theory.md §3: V^{pi_n}(s) non-decreasing at every state, for every dt (round-off ~1e-15 |V|)
    assert np.diff(np.array(values), axis=0).min() > -1e-12


@pytest.mark.parametrize("tau", [0.005, 0.01, 0.03])
@pytest.mark.parametrize("dt", [0.1, 5.0])
def test_stress_small_tau_large_dt_double_well(tau, dt):
    """Tiny temperatures make exp(Q / tau) span hundreds of decades: no overflow, no NaN, structure holds."""
    space = interval_space(-2.5, 2.5, 200)
    mdp = build_mdp(double_well(B=0.3, depth=0.5), np.linspace(-2, 2, 41), space, 0.9, tau)
    opt = bellman.soft_policy_iteration(mdp)
    J_star = mdp.rho @ opt.V
    a = space.coords[:, 0]
    p0 = np.tile(np.exp(-0.5 * ((a + 1) / 0.3) ** 2), (mdp.n_states, 1))
    p0 /= (p0 @ space.weights)[:, None]
    flow = flows.make("wasserstein", mdp, dt=dt)
    rows = [diagnostics.record(flow, s, J_star) for s in _take(flows.trajectory(flow, p0), 20)]
    J = np.array([r["J"] for r in rows])
    assert np.all(np.isfinite(J)) and np.all(np.isfinite([r["dissipation"] for r in rows]))
    assert np.diff(J).min() > -1e-12 * np.abs(J).max()
    assert max(r["mass_error"] for r in rows) < 1e-12
    assert min(r["min_density"] for r in rows) >= 0
    assert min(r["gap"] for r in rows) > -1e-12 * abs(J_star)  # never beyond the optimum


def _take(iterator, n):
    for i, item in enumerate(iterator):
        yield item
        if i + 1 == n:
            return


# --- Ornstein-Uhlenbeck (theory.md §7.3) -----------------------------------------------------------------

OU = {"k": 1.0, "center": 0.5, "tau": 0.5, "m0": -0.5, "v0": 0.25}


def ou_mdp(cells):
    """Domain [-6, 6]: the mean stays in [-0.5, 0.5] and std <= sqrt(tau/k) = 0.707, so every Gaussian on the
    path keeps 7.8 standard deviations inside (tail mass < 1e-14, far below every tolerance here)."""
    space = interval_space(-6.0, 6.0, cells)
    return build_mdp(bandit(k=OU["k"], center=OU["center"]), np.array([0.0]), space, 0.9, OU["tau"])


def gaussian(a, mean, var):
    return np.exp(-0.5 * (a - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


def ou_initial(mdp):
    a = mdp.space.coords[:, 0]
    p = gaussian(a, OU["m0"], OU["v0"])[None, :]
    return p / (p @ mdp.weights)[:, None]


def l1_to_exact(mdp, p, t):
    a = mdp.space.coords[:, 0]
    mean, var = oracles.ou_moments(t, OU["k"], OU["center"], OU["tau"], OU["m0"], OU["v0"])
    return float(np.abs(p[0] - gaussian(a, mean, var)) @ mdp.weights)


def test_bandit_flow_matches_exact_ou_density():
    """The issue's bar: L1 <= 1e-3 at 256 cells, dt = 2.5e-4. Measured ~4e-4 (3.4e-4 from h^2, 8e-5 from dt)."""
    mdp = ou_mdp(256)
    checks = {0.25: None, 0.5: None, 1.0: None}
    for state in flows.states("wasserstein", mdp, ou_initial(mdp), dt=2.5e-4, t_end=1.0):
        for t in checks:
            if abs(state.t - t) < 1e-9:
                checks[t] = l1_to_exact(mdp, state.p, t)
    assert all(error is not None and error < 1e-3 for error in checks.values()), checks


def semi_discrete(mdp, t):
    """The exact-in-time solution of the semi-discrete ODE dm/dt = L m (Q is constant for a bandit)."""
    g = flows.potential(mdp, bellman.evaluate(mdp, ou_initial(mdp)).Q)[0]
    L = fokker_planck.generator(mdp.space, g, mdp.tau).toarray()
    masses = sla.expm(t * L) @ (ou_initial(mdp)[0] * mdp.weights)
    return (masses / mdp.weights)[None, :]


def slope(x, y):
    return np.polyfit(np.log(x), np.log(y), 1)[0]


def test_time_error_is_first_order():
    """Implicit Euler against the exact semi-discrete solution on the same mesh isolates the time error."""
    mdp = ou_mdp(64)
    reference = semi_discrete(mdp, 0.5)
    dts = np.array([0.02, 0.01, 0.005, 0.0025])
    errors = []
    for dt in dts:
        for state in flows.states("wasserstein", mdp, ou_initial(mdp), dt=dt, t_end=0.5):
            pass
        errors.append(float(np.abs(state.p - reference)[0] @ mdp.weights))
    assert slope(dts, errors) == pytest.approx(1.0, abs=0.1)  # first order; 0.1 allows pre-asymptotic drift


@pytest.mark.parametrize("scheme", fokker_planck.SCHEMES)
def test_space_error_is_second_order(scheme):
    """Exact time integration (expm) leaves the O(h^2) spatial error of the edge-averaged P1 scheme."""
    cells = np.array([28, 56, 112, 224])
    errors = []
    for n in cells:
        mdp = ou_mdp(int(n))
        g = flows.potential(mdp, bellman.evaluate(mdp, ou_initial(mdp)).Q)[0]
        L = fokker_planck.generator(mdp.space, g, mdp.tau, scheme).toarray()
        masses = sla.expm(0.5 * L) @ (ou_initial(mdp)[0] * mdp.weights)
        errors.append(l1_to_exact(mdp, (masses / mdp.weights)[None, :], 0.5))
    assert slope(12.0 / cells, errors) == pytest.approx(2.0, abs=0.15)


def test_bandit_gap_matches_closed_form():
    """J* - J along the flow equals tau/(1-gamma) KL(N(m, v) || N(c, tau/k)) (theory.md §7.3), to O(dt + h^2)."""
    mdp = ou_mdp(256)
    J_star = float(bellman.soft_policy_iteration(mdp).V[0])
    assert J_star == pytest.approx(OU["tau"] / (2 * 0.1) * math.log(2 * math.pi * OU["tau"] / OU["k"]), abs=1e-10)
    for state in flows.states("wasserstein", mdp, ou_initial(mdp), dt=1e-3, t_end=0.5):
        pass
    mean, var = oracles.ou_moments(0.5, OU["k"], OU["center"], OU["tau"], OU["m0"], OU["v0"])
    exact = oracles.ou_gap(mean, var, OU["k"], OU["center"], OU["tau"], 0.9)
    assert J_star - state.evaluation.V[0] == pytest.approx(exact, rel=2e-3)  # dt = 1e-3 error ~ dt * rate


# --- rates ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.3])
def test_lqr_rate_matches_oracle(tau):
    """theory.md §7.2: implicit Euler's gap rate is 2 log(1 + 2 alpha dt)/dt, independent of tau.

    At tau <= 0.3 the Gibbs policies stay > 5 standard deviations inside [-6, 6] at every state, so all
    states share the gap 2 alpha and the fit on [1e-10, 1e-5] is clean (theory.md §8.6). At tau = 1 the
    outer states' truncated policies relax faster and the same window reads ~4% high (see README).
    The smaller tau, the narrower the Gibbs policy (std sqrt(tau / (2 alpha)) = 0.17 = 3.6 cells at
    tau = 0.05), and the discrete gap is O(h^2 / Sigma) below 2 alpha: measured -1.2%, -0.55%, -0.29% at
    256, 384, 512 cells for tau = 0.05 (ratio 2.25 per refinement, second order), inside the 2% bar.
    """
    dt = 0.01
    mdp = build_mdp(lqr(**LQR_PARAMS), np.linspace(-6, 6, 81), interval_space(-6, 6, 256), 0.9, tau)
    J_star = float(mdp.rho @ bellman.soft_policy_iteration(mdp).V)
    t, gap = [], []
    for state in flows.states("wasserstein", mdp, bellman.uniform_policy(mdp), dt=dt, t_end=12.0):
        t.append(state.t)
        gap.append(J_star - mdp.rho @ state.evaluation.V)
        if gap[-1] < 1e-10:
            break
    fit = diagnostics.fit_rate(np.array(t), np.array(gap))
    exact = oracles.lqr_optimum(**LQR_PARAMS, gamma=0.9, tau=tau)
    assert fit.window == diagnostics.RATE_WINDOW
    assert fit.rate == pytest.approx(exact.wpg_rate(dt), rel=0.02)
