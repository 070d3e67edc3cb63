"""2D actions: models, the 2D-action LQR and 2D OU oracles, and the batched 2D implicit solves (theory.md §3, §7)."""

import math

import numpy as np
import pytest

from solver import bellman, budget, fem, flows, models, oracles
from solver.flows import fokker_planck
from solver.config import ConfigError
from solver.fem import interval_space, rectangle_space
from solver.mdp import build_mdp

# --- models --------------------------------------------------------------------------------------------------


def test_model_shapes_follow_the_2d_conventions():
    """interfaces.md: a 2D-action model gets a (1, M, 2), a 2D-state model s (N, 1, 2) and returns (N, M, 2)."""
    s1, s2, a = np.linspace(-1, 1, 3)[:, None], np.zeros((3, 1, 2)) + 0.5, np.ones((1, 4, 2))
    m = models.build("lqr", {"A": 0.9, "B": [0.5, 0.3], "q": 2.0, "r": [0.5, 1.0]})
    assert (m.action_dim, m.state_dim) == (2, 1)
    np.testing.assert_allclose(m.reward(s1, a), -(2.0 * s1 ** 2 + 1.5) * np.ones((3, 4)))
    np.testing.assert_allclose(m.dynamics(s1, a), 0.9 * s1 + 0.8 * np.ones((3, 4)))
    m = models.build("lqr", {"A": [[0.9, 0.1], [0.0, 0.8]], "B": [[0.5, 0.0], [0.2, 0.4]], "r": 0.5})
    assert (m.action_dim, m.state_dim) == (2, 2)
    assert m.reward(s2, a).shape == (3, 4) and m.dynamics(s2, a).shape == (3, 4, 2)
    np.testing.assert_allclose(m.dynamics(s2, a)[0, 0], [0.5 + 0.5, 0.4 + 0.6])
    np.testing.assert_allclose(m.reward(s2, a), -(0.5 + 1.0) * np.ones((3, 4)))
    ring = models.build("ring", {"radius": 2.0, "depth": 3.0, "q": 0.0})
    assert ring.reward(s1, np.array([[[2.0, 0.0], [0.0, 0.0]]])).tolist() == [[0.0, -3.0]] * 3
    well = models.build("four_well", {"width": 0.5, "depth": 1.0, "q": 0.0})
    assert well.reward(s1, np.array([[[0.5, -0.5], [0.0, 0.5]]])).tolist() == [[0.0, -1.0]] * 3
    assert models.build("bandit", {"center": [0.5, 0.0]}).action_dim == 2


@pytest.mark.parametrize("params,message", [
    ({"B": [1, 2, 3]}, "mdp.params.B: must be a number or a list of 2 numbers or a 2x2 nested list and finite"),
    ({"B": [True, 1]}, "mdp.params.B: must be a number"),
    ({"B": ["1", 2]}, "mdp.params.B: must be a number"),
    ({"B": [[1, 2], [3]]}, "mdp.params.B: must be a number"),
    ({"B": [1, 1], "r": [1, -1]}, "mdp.params.r: must be > 0 (a number or a list of 2 numbers) and finite"),
    ({"r": [1, 1]}, "mdp.params.r: must be a number when B is a number"),
    ({"A": [[1, 0], [0, 1]], "B": [1, 2]}, "mdp.params.A: must be a number when B is a 2-vector"),
    ({"q": [1, 2]}, "mdp.params.q: must be >= 0 and finite"),
])
def test_bad_vector_parameters_name_the_key(params, message):
    with pytest.raises(ConfigError) as err:
        models.build("lqr", params)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_action_dimension_must_match_the_domain():
    with pytest.raises(ConfigError, match="actions: the model has 2D actions but the action domain is 1D"):
        build_mdp(models.ring(), np.linspace(-1, 1, 3), interval_space(-1, 1, 4), 0.9, 0.5)


# --- 2D-action LQR (scalar state) ----------------------------------------------------------------------------

LQR2 = {"A": 0.9, "B": [0.5, 0.3], "q": 1.0, "r": [0.5, 1.0], "sigma": 0.5}


@pytest.mark.parametrize("std", [None, 1.0])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_lqr2_oracle_reduces_to_the_scalar_one(tau, std):
    """b = (B, 0): the first action is theory.md §7.1's; the second is an independent N(0, tau / (2 r~)) factor."""
    scalar = oracles.lqr_optimum(0.9, 0.5, 1.0, 0.5, 0.3, 0.9, tau, std)
    two = oracles.lqr2_optimum(0.9, [0.5, 0.0], 1.0, 0.5, 0.3, 0.9, tau, std)
    assert two.P == pytest.approx(scalar.P, rel=1e-14)
    np.testing.assert_allclose(two.K, [scalar.K, 0.0], rtol=1e-14, atol=0)
    r2 = 0.5 + (0.0 if std is None else tau / (2 * std ** 2))
    np.testing.assert_allclose(two.Sigma, np.diag([scalar.Sigma, tau / (2 * r2)]), rtol=1e-14, atol=0)
    c_mu = 0.0 if std is None else -0.5 * tau * math.log(2 * math.pi * std ** 2)
    second = (0.5 * tau * math.log(2 * math.pi * tau / (2 * r2)) + c_mu) / (1 - 0.9)
    assert two.c == pytest.approx(scalar.c + second, rel=1e-13)


@pytest.mark.parametrize("std", [None, 0.7])
def test_lqr2_oracle_solves_its_riccati_equation(std):
    """P = q + gamma A^2 P - (gamma A P)^2 b^T alpha^{-1} b, with alpha = R~ + gamma P b b^T (no Sherman-Morrison)."""
    tau, gamma, A, q = 0.4, 0.9, 0.9, 1.0
    opt = oracles.lqr2_optimum(A, LQR2["B"], q, LQR2["r"], 0.5, gamma, tau, std)
    b = np.array(LQR2["B"])
    R = np.diag(LQR2["r"]) + (0 if std is None else tau / (2 * std ** 2)) * np.eye(2)
    alpha = R + gamma * opt.P * np.outer(b, b)
    residual = q + gamma * A ** 2 * opt.P - (gamma * A * opt.P) ** 2 * b @ np.linalg.solve(alpha, b) - opt.P
    assert abs(residual) < 1e-13
    np.testing.assert_allclose(opt.alpha, alpha, rtol=1e-14)
    np.testing.assert_allclose(opt.K, gamma * opt.P * A * np.linalg.solve(alpha, b), rtol=1e-14)
    assert opt.wpg_rate() == pytest.approx(4 * np.linalg.eigvalsh(alpha)[0], rel=1e-14)


def test_lqr_closed_form_dispatches_on_the_shape_of_B():
    assert oracles.lqr_closed_form({}, 0.9, 1.0) == oracles.lqr_optimum(0.9, 0.5, 1.0, 0.5, 0.3, 0.9, 1.0)
    two = oracles.lqr_closed_form(LQR2, 0.9, 0.5, 1.0)
    assert two.as_dict() == oracles.lqr2_optimum(**LQR2, gamma=0.9, tau=0.5, reference_std=1.0).as_dict()
    state2 = oracles.lqr_closed_form({"B": [[1, 0], [0, 1]]}, 0.9, 0.5)  # 2D state
    assert state2.as_dict() == oracles.lqr_state2_optimum(0.9, np.eye(2), 1.0, 0.5, 0.3, 0.9, 0.5).as_dict()


@pytest.fixture(scope="module")
def lqr2_problem():
    """Actions [-4, 4]^2, 16 x 16 crossed cells (545 DOFs, h = 0.5); states [-4, 4] x 33 (h_s = sigma / 2).

    At |s| <= 1 the optimal Gaussians (std <= 0.58, mean |K s| <= 0.75) keep > 5.5 std inside the square.
    The lumped P1 weights of the crossed mesh are 2/3 trapezoid on the vertex lattice + 1/3 midpoint on the
    cell centres, both exponentially accurate for Gaussians (Poisson summation): measured errors at h = 0.5
    are <= 1.6e-7 (Lebesgue) and 1.5e-6 (Gaussian reference); at h = 2/3 they grow to 5e-5 and 5e-4.
    """
    return rectangle_space((-4.0, -4.0), (4.0, 4.0), (16, 16)), np.linspace(-4.0, 4.0, 33)


@pytest.mark.parametrize("reference,std", [("lebesgue", None), ("gaussian", 1.0)])
def test_lqr2_discrete_optimum_matches_closed_form(lqr2_problem, reference, std):
    space, states = lqr2_problem
    tau, gamma = 0.5, 0.9
    mdp = build_mdp(models.build("lqr", LQR2), states, space, gamma, tau, reference, std or 1.0)
    opt = bellman.soft_policy_iteration(mdp)
    exact = oracles.lqr2_optimum(**LQR2, gamma=gamma, tau=tau, reference_std=std)
    inner = np.abs(states) <= 1.0
    masses = opt.p * space.weights
    mean = masses @ space.coords  # (N, 2) policy means by the mesh quadrature
    centred = space.coords[None] - mean[:, None]
    cov = np.einsum("ij,ijk,ijl->ikl", masses, centred, centred)
    # the bar for V* is 1e-5; the moments are held to the same absolute tolerance
    assert np.abs(opt.V - exact.value(states))[inner].max() < 1e-5
    assert np.abs(mean - exact.mean(states))[inner].max() < 1e-5
    assert np.abs(cov - exact.Sigma)[inner].max() < 1e-5


# --- 2D Ornstein-Uhlenbeck bandit ----------------------------------------------------------------------------

OU2 = {"k": 1.0, "center": np.array([0.5, 0.0]), "tau": 0.5, "m0": np.array([0.2, 0.1]), "v0": 0.25}


def gaussian2(a, mean, cov):
    d = a - mean
    quad = np.einsum("ij,jk,ik->i", d, np.linalg.inv(cov), d)
    return np.exp(-0.5 * quad) / (2 * math.pi * math.sqrt(np.linalg.det(cov)))


def test_ou2_moments_solve_the_moment_equations():
    """m' = -k (m - c), V' = -2 k V + 2 tau I (central differences on the closed form)."""
    args = (OU2["k"], OU2["center"], OU2["tau"], OU2["m0"], np.array([[0.3, 0.1], [0.1, 0.2]]))
    t, h = 0.7, 1e-5
    (m_plus, v_plus), (m, v), (m_minus, v_minus) = (oracles.ou2_moments(x, *args) for x in (t + h, t, t - h))
    np.testing.assert_allclose((m_plus - m_minus) / (2 * h), -OU2["k"] * (m - OU2["center"]), atol=1e-9)
    np.testing.assert_allclose((v_plus - v_minus) / (2 * h), -2 * OU2["k"] * v + 2 * OU2["tau"] * np.eye(2), atol=1e-9)


OU_DOMAINS = {
    # [-3.5, 3.5]^2, 56 x 56 crossed cells (h = 0.125, 6385 DOFs): the path's Gaussians keep >= 4.2 std inside.
    # Measured L1 1.55e-3 (t = 0.25), 1.41e-3 (t = 0.5): O(h^2) ~0.9e-3 (3.0e-3 at 40 cells, 1.1e-3 at 80 cells,
    # dt = 2.5e-3) plus O(dt) ~0.6e-3 (2.2e-3 at dt = 5e-3).
    "rectangle": (lambda: rectangle_space((-3.5, -3.5), (3.5, 3.5), (56, 56)), 2.5e-3),
    # shipped fine disk mesh (2762 DOFs) scaled to radius 3 around the path's midpoint (mean edge 0.11): >= 4.0 std
    # inside, radial tail mass exp(-8) = 3e-4 of the exact Gaussian outside. Measured L1 1.62e-3 / 1.54e-3 at
    # dt = 1.25e-3 (1.93e-3 at 2.5e-3, 2.55e-3 at 5e-3). This is the default mesh; the coarse one (467 DOFs) gives 8e-3.
    "disk": (lambda: fem.domain_space("disk", scale=3.0, center=(0.35, 0.05)), 1.25e-3),
}


@pytest.mark.parametrize("domain", OU_DOMAINS)
def test_bandit_2d_flow_matches_exact_gaussian_density(domain):
    """L1 <= 2e-3 (the issue's bar) against the exact OU Gaussian at t = 0.25 and 0.5 (numbers in OU_DOMAINS).

    The gap J* - J is checked against tau/(1-gamma) KL of the exact Gaussians (oracles.ou2_gap).
    """
    make_space, dt = OU_DOMAINS[domain]
    space = make_space()
    mdp = build_mdp(models.bandit(OU2["k"], OU2["center"]), np.array([0.0]), space, 0.9, OU2["tau"])
    J_star = float(bellman.soft_policy_iteration(mdp).V[0])
    p0 = gaussian2(space.coords, OU2["m0"], OU2["v0"] * np.eye(2))[None]
    p0 /= (p0 @ space.weights)[:, None]
    errors = {}
    for state in flows.states("wasserstein", mdp, p0, dt=dt, t_end=0.5):
        if any(abs(state.t - t) < 1e-9 for t in (0.25, 0.5)):
            mean, cov = oracles.ou2_moments(state.t, OU2["k"], OU2["center"], OU2["tau"], OU2["m0"], OU2["v0"])
            errors[round(state.t, 6)] = float(np.abs(state.p[0] - gaussian2(space.coords, mean, cov)) @ space.weights)
    assert sorted(errors) == [0.25, 0.5] and max(errors.values()) < 2e-3, errors
    exact_gap = oracles.ou2_gap(mean, cov, OU2["k"], OU2["center"], OU2["tau"], 0.9)
    assert J_star - state.evaluation.V[0] == pytest.approx(exact_gap, rel=2e-2)  # O(dt + h^2) in the gap; 0.7% measured


def test_bandit_2d_optimum_is_the_truncated_gaussian_free_energy():
    """J* = tau/(1-gamma) log(2 pi tau / k * Gibbs mass inside the square) (theory.md §7.3 in 2D, truncated).

    On [-3.5, 3.5]^2 the mass factor is 1 - 1.2e-5, a shift of 6e-5 in J*. The lumped quadrature is exponentially
    accurate inside but O(h^2 |grad p|) at the edge, where p is 1e-4 of its peak: measured error 1.5e-6.
    """
    space = rectangle_space((-3.5, -3.5), (3.5, 3.5), (56, 56))
    mdp = build_mdp(models.bandit(OU2["k"], OU2["center"]), np.array([0.0]), space, 0.9, OU2["tau"])
    J_star = float(bellman.soft_policy_iteration(mdp).V[0])
    std = math.sqrt(OU2["tau"] / OU2["k"])
    inside = np.prod([0.5 * (math.erf((3.5 - c) / (std * math.sqrt(2))) - math.erf((-3.5 - c) / (std * math.sqrt(2))))
                      for c in OU2["center"]])
    assert J_star == pytest.approx(OU2["tau"] / 0.1 * math.log(2 * math.pi * std ** 2 * inside), abs=1e-5)


# --- batched implicit solves on triangle meshes --------------------------------------------------------------


def rough_potential(space, n, spread, seed=0):
    """(n, M) potentials with random slopes and bumps spanning ``spread`` (huge spread = tiny tau)."""
    rng = np.random.default_rng(seed)
    a = space.coords
    g = a @ rng.normal(size=(2, n)) + np.sin(a @ rng.normal(size=(2, n)) * 3)
    g = g.T
    return spread * (g - g.min(axis=1, keepdims=True)) / np.ptp(g, axis=1, keepdims=True)


MESHES = {  # structured square, and the shipped coarse meshes of the disk and the non-convex L-shape and annulus
    "square": lambda: rectangle_space((-2.0, -2.0), (2.0, 2.0), (12, 12)),
    "disk": lambda: fem.domain_space("disk", resolution="coarse", scale=2.0),
    "lshape": lambda: fem.domain_space("lshape", resolution="coarse", scale=2.0),
    "annulus": lambda: fem.domain_space("annulus", resolution="coarse", scale=2.0),
}


@pytest.fixture(scope="module", params=sorted(MESHES))
def mesh(request):
    return MESHES[request.param]()


@pytest.mark.parametrize("spread", [1.0, 400.0])
@pytest.mark.parametrize("dt", [1e-3, 5.0])
@pytest.mark.parametrize("scheme", fokker_planck.SCHEMES)
def test_sparse_and_banded_solves_agree_to_round_off(mesh, spread, dt, scheme, monkeypatch):
    n = 7
    g = rough_potential(mesh, n, spread)
    p = np.random.default_rng(1).uniform(0.0, 2.0, size=(n, mesh.n_dofs))
    masses = p / (p @ mesh.weights)[:, None] * mesh.weights
    banded = fokker_planck.implicit_step(mesh, masses, g, 0.3, dt, scheme, method="banded")
    sparse = fokker_planck.implicit_step(mesh, masses, g, 0.3, dt, scheme, method="sparse")
    monkeypatch.setattr(budget, "SOLVE_CHUNK_BYTES", 1)  # one state per chunk: chunking must not change anything
    chunked = fokker_planck.implicit_step(mesh, masses, g, 0.3, dt, scheme, method="sparse")
    # both are direct solves of a diagonally dominant M-matrix: they agree componentwise to round-off of the
    # state's total mass 1 (measured <= 2e-15 when dt = 5 piles the mass onto one node; 1e-14 is ~45 ulps)
    np.testing.assert_allclose(sparse, banded, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(chunked, sparse)
    assert np.abs(sparse.sum(axis=1) - masses.sum(axis=1)).max() < 1e-14
    assert sparse.min() >= 0


@pytest.mark.parametrize("method", ["banded", "sparse"])
@pytest.mark.parametrize("dt", [1e-3, 0.5, 5.0])
def test_gibbs_optimum_is_an_exact_fixed_point_in_2d(mesh, method, dt):
    mdp = build_mdp(models.four_well(B=[0.3, -0.2], depth=0.5), np.linspace(-2, 2, 17), mesh, 0.8, 0.3)
    opt = bellman.soft_policy_iteration(mdp)
    masses = opt.p * mesh.weights
    new = fokker_planck.implicit_step(mesh, masses, flows.potential(mdp, opt.Q), mdp.tau, dt, method=method)
    assert np.max(np.abs(new - masses)) < 1e-14  # round-off of one direct solve


def _take(iterator, n):
    for i, item in enumerate(iterator):
        yield item
        if i + 1 == n:
            return


@pytest.mark.parametrize("name,params", [("ring", {"B": [0.3, 0.1], "radius": 1.2, "depth": 0.5}),
                                         ("four_well", {"B": [0.2, -0.3], "width": 1.0, "depth": 0.5})])
@pytest.mark.parametrize("tau", [0.01, 0.1])
@pytest.mark.parametrize("dt", [0.1, 5.0])
def test_stress_2d_small_tau_large_dt(mesh, name, params, tau, dt):
    """exp(Q / tau) spans hundreds of decades at tau = 0.01: no NaN, J monotone, mass exact, density >= 0."""
    mdp = build_mdp(models.build(name, params), np.linspace(-2, 2, 21), mesh, 0.9, tau)
    J_star = float(mdp.rho @ bellman.soft_policy_iteration(mdp).V)
    p0 = np.tile(gaussian2(mesh.coords, np.array([-1.0, 0.5]), 0.1 * np.eye(2)), (mdp.n_states, 1))
    p0 /= (p0 @ mesh.weights)[:, None]
    J = []
    for state in _take(flows.states("wasserstein", mdp, p0, dt=dt), 12):
        J.append(float(mdp.rho @ state.evaluation.V))
        assert np.all(np.isfinite(state.p)) and np.all(np.isfinite(state.evaluation.V))
        assert np.max(np.abs(state.p @ mesh.weights - 1)) < 1e-13  # mass: round-off of a few direct solves
        assert state.p.min() >= 0
    J = np.array(J)
    assert np.diff(J).min() > -1e-12 * np.abs(J).max()  # monotone up to round-off of V (~1e-13 |J|)
    assert J.max() < J_star + 1e-12 * abs(J_star)  # never beyond the optimum


def test_generator_gaps_sparse_path_matches_dense(monkeypatch):
    """Shift-invert Lanczos (meshes above DENSE_GAP_DOFS) finds the same gap as the dense eigen-solve."""
    from solver import bellman, diagnostics, fem
    from solver.mdp import build_mdp
    from solver.models import build

    space = fem.domain_space("disk", resolution="coarse", scale=1.5)
    model = build("ring", {"A": 0.9, "B": [0.2, 0.1], "q": 1.0, "depth": 1.0, "radius": 1.0, "sigma": 0.3})
    mdp = build_mdp(model, np.linspace(-1, 1, 5), space, 0.9, 0.3)
    Q = bellman.soft_policy_iteration(mdp).Q
    monkeypatch.setattr(diagnostics, "DENSE_GAP_DOFS", 10 ** 6)
    dense = diagnostics.generator_gaps(mdp, Q)
    monkeypatch.setattr(diagnostics, "DENSE_GAP_DOFS", 0)
    sparse = diagnostics.generator_gaps(mdp, Q)
    # both are converged to machine precision (tol=0 in eigsh); 1e-9 leaves room for the eigenvalue's conditioning
    np.testing.assert_allclose(sparse, dense, rtol=1e-9)
