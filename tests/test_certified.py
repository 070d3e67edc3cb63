"""Certified entropy-production (modified log-Sobolev) constants of reversible chains (solver/lsi.py,
theory.md §10.1) against brute force, and of the flow's SG/EAFE generator against the run's own dissipation."""

import math

import numpy as np
import pytest
import scipy.optimize as opt

from solver import lsi
from solver.fem import interval_space, rectangle_space
from solver.flows.fokker_planck import dissipation, edge_rates, generator


def random_chain(rng, m: int, spread: float):
    """A connected reversible chain on ``m`` states: a path plus random chords, ``log pi`` with standard deviation
    ``spread``, and symmetric conductances ``q_e`` (any ``q_e > 0`` is in detailed balance with ``pi``)."""
    edges = {(i, i + 1) for i in range(m - 1)}
    for _ in range(m):
        j, k = sorted(rng.choice(m, 2, replace=False))
        edges.add((int(j), int(k)))
    edges = np.array(sorted(edges))
    log_pi = spread * rng.normal(size=m)
    log_pi -= np.log(np.exp(log_pi).sum())
    log_q = 0.5 * (log_pi[edges[:, 0]] + log_pi[edges[:, 1]]) + rng.normal(size=len(edges))
    return log_pi, edges, log_q


def brute_force_rho0(log_pi, edges, log_q, rng, starts: int = 60) -> tuple[float, np.ndarray]:
    """``min E(u, log u) / Ent(u)`` by L-BFGS from many random starts of several scales, then Nelder-Mead."""
    best = math.inf, None
    for n in range(starts):
        v0 = rng.normal(size=log_pi.size) * (0.3, 1.0, 3.0, 10.0)[n % 4]
        res = opt.minimize(lsi.mlsi_ratio, v0, args=(log_pi, edges, log_q), jac=True, method="L-BFGS-B",
                           options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
        value = lsi.mlsi_ratio(res.x, log_pi, edges, log_q)[0]
        if value < best[0]:
            best = value, res.x
    polish = opt.minimize(lambda v: lsi.mlsi_ratio(v, log_pi, edges, log_q)[0], best[1], method="Nelder-Mead",
                          options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20000})
    return (float(polish.fun), polish.x) if polish.fun < best[0] else best


def test_two_point_lsi_constant_is_dsc_closed_form():
    """DSC 1996 Theorem A.1: the chain K(x, y) = pi(y) on two points (Dirichlet form = Var) has LSI constant
    alpha = inf Var(f) / Ent(f^2) = (1 - 2 theta) / log((1 - theta) / theta). Brute force over f = (x, 1) on a
    fine log grid (alpha is scale invariant) checks the convention that mlsi_lower relies on."""
    for theta in (0.3, 0.1, 1e-3, 1e-8):
        pi = np.array([theta, 1 - theta])
        x = np.exp(np.linspace(-40, 40, 400001))
        f2 = np.stack([x ** 2, np.ones_like(x)])
        S = pi @ f2
        ent = pi @ (f2 * np.log(f2)) - S * np.log(S)
        var = theta * (1 - theta) * (x - 1) ** 2
        ratio = np.where(ent > 1e-300, var / np.maximum(ent, 1e-300), np.inf)
        exact = (1 - 2 * theta) / math.log((1 - theta) / theta)
        # grid spacing 2e-4 in log x: the minimum is flat, so the grid error is O(spacing^2) relative
        assert ratio.min() == pytest.approx(exact, rel=1e-6)
        # the trivial chain has ell = 1 and the bound 4 alpha ell is then exact in alpha
        assert lsi.mlsi_lower(np.array([1.0]), np.array([math.log(theta)]))[0] == pytest.approx(4 * exact, rel=1e-12)


def test_lower_bound_handles_astronomically_small_pi_star():
    """log(1/pi_* - 1) = -log pi_* + log1p(-pi_*) from log pi_*: finite for pi_* = e^-5000 (underflows)."""
    value = lsi.mlsi_lower(np.array([2.0, 2.0]), np.array([-5000.0, -50.0]))
    assert value[0] == pytest.approx(4 * 2.0 / 5000.0, rel=1e-12)
    assert value[1] == pytest.approx(4 * (1 - 2 * math.exp(-50)) * 2.0 / (50 + math.log1p(-math.exp(-50))))


@pytest.mark.parametrize("m,spread,seed", [(4, 0.5, 0), (5, 2.0, 1), (6, 1.0, 2), (7, 3.0, 3), (8, 2.0, 4)])
def test_bracket_contains_brute_force_constant(m, spread, seed):
    """On small random reversible chains: lower <= rho_0 (brute force) <= upper <= 2 ell, and the lower bound
    within the DSC log factor log(1/pi_* - 1) / (2 (1 - 2 pi_*)) of the true constant."""
    rng = np.random.default_rng(seed)
    log_pi, edges, log_q = random_chain(rng, m, spread)
    gap, _ = lsi.chain_gap(log_pi, edges, log_q)
    true, v = brute_force_rho0(log_pi, edges, log_q, rng)
    lower = lsi.mlsi_lower(np.array([gap]), np.array([log_pi.min()]))[0]
    upper = lsi.mlsi_upper(log_pi, edges, log_q, gap, seed=seed)
    assert 0 < lower <= true
    # the brute force is a minimum over more starts than mlsi_upper: both are ratios of actual u, so only
    # round-off (1e-9 relative) may put the upper bound below it
    assert true <= upper.value * (1 + 1e-9) and upper.value <= 2 * gap * (1 + 1e-12)
    pi_min = math.exp(log_pi.min())
    factor = math.log(1 / pi_min - 1) / (2 * (1 - 2 * pi_min))
    assert true / lower <= factor * (1 + 1e-9)
    # rho_0 >= 4 alpha rests on E(u, log u) >= 4 E(sqrt u, sqrt u): at the minimiser, the LSI ratio of sqrt(u)
    assert 4 * _lsi_ratio(np.exp(0.5 * (v - v.max())), log_pi, edges, log_q) <= true * (1 + 1e-9)


def _lsi_ratio(f, log_pi, edges, log_q):
    """``E(f, f) / Ent_pi(f^2)`` (DSC's alpha is its infimum)."""
    pi = np.exp(log_pi)
    j, k = edges[:, 0], edges[:, 1]
    E = np.exp(log_q) @ (f[j] - f[k]) ** 2
    f2 = f * f
    S = pi @ f2
    return E / (pi @ (f2 * np.log(f2)) - S * math.log(S))


@pytest.mark.parametrize("scheme", ["sg", "sqra"])
def test_mesh_chain_is_the_flow_generator(scheme):
    """The chain of log_conductances is the SG/SQRA generator: tau E(u, log u) = D^h (the dissipation the flow
    reports), and its gap equals the dense spectrum of fokker_planck.generator; pi is stationary."""
    space = interval_space(-3.0, 3.0, 40)
    a = space.coords[:, 0]
    tau = 0.3
    g = (-(a - 0.7) ** 2 / 0.4 + 0.5 * np.sin(3 * a))  # non-Gaussian potential
    log_pi = lsi.log_stationary(space, g)[0]
    log_q = lsi.log_conductances(space, g, tau, scheme)[0]
    rng = np.random.default_rng(0)
    p = np.exp(g + 0.3 * rng.normal(size=a.size))
    p /= p @ space.weights
    u = p * space.weights / np.exp(log_pi)
    j, k = space.edges[:, 0], space.edges[:, 1]
    E = np.exp(log_q) @ ((u[j] - u[k]) * (np.log(u[j]) - np.log(u[k])))

    class _M:  # the two attributes dissipation() reads
        pass
    mdp = _M()
    mdp.space, mdp.tau = space, tau
    D = dissipation(mdp, p[None, :], g[None, :], scheme)[0]
    assert tau * E == pytest.approx(D, rel=1e-12)
    L = generator(space, g, tau, scheme).toarray()
    assert np.abs(L @ np.exp(log_pi)).max() < 1e-12 * np.abs(L).max()
    spectrum = np.sort(-np.linalg.eigvals(L).real)
    assert lsi.chain_gap(log_pi, space.edges, log_q)[0] == pytest.approx(spectrum[1], rel=1e-9)
    fwd, bwd = edge_rates(space, g[None, :], tau, scheme)
    assert np.allclose(np.exp(log_q), fwd[0] * np.exp(log_pi[j]) / space.weights[j], rtol=1e-12)
    assert np.allclose(np.exp(log_q), bwd[0] * np.exp(log_pi[k]) / space.weights[k], rtol=1e-12)


def test_sturm_counts_and_warm_started_gaps_are_certified_lower_bounds():
    """Sturm counts equal the number of eigenvalues below x (dense check); the GapTracker's gaps, cold (LAPACK)
    and warm (one Sturm sweep after a small change of the potential), are lower bounds of the exact gap within
    0.1% (the warm grid STURM_GRID has steps <= 0.05% near 1), and on a 2D mesh (ARPACK) within 1e-6."""
    rng = np.random.default_rng(3)
    space = interval_space(-3.0, 3.0, 60)
    a = space.coords[:, 0]
    g = np.stack([-(a - c) ** 2 / 0.5 + 0.3 * np.sin(2 * a + c) for c in (-1.0, 0.0, 0.5, 2.0)])
    diag, off = lsi.symmetrised_generator(space, g, 0.4)
    x = np.stack([np.sort(rng.uniform(0, 3, 5)) for _ in range(4)])
    counts = lsi.sturm_counts(diag, off, x)
    for s in range(4):
        S = np.diag(diag[s]) + np.diag(off[s], 1) + np.diag(off[s], -1)
        values = np.linalg.eigvalsh(S)
        assert np.array_equal(counts[s], (values[None, :] < x[s][:, None]).sum(axis=1))

    def exact(gs):
        return np.array([lsi.chain_gap(lsi.log_stationary(space, row)[0], space.edges,
                                       lsi.log_conductances(space, row, 0.4)[0])[0] for row in gs])

    tracker = lsi.GapTracker(space, 0.4)
    cold = tracker(g)
    assert np.all(cold <= exact(g)) and np.allclose(cold, exact(g), rtol=2e-6)
    g2 = g + 2e-3 * rng.normal(size=g.shape).cumsum(axis=1) / 10
    warm, truth = tracker(g2), exact(g2)
    assert np.all(warm <= truth) and np.all(warm >= (1 - 1e-3) * truth)
    square = rectangle_space((-2.0, -2.0), (2.0, 2.0), (10, 10))
    b = square.coords
    g2d = -np.sum((b - 0.3) ** 2, axis=1)[None, :] / 0.6
    ell = lsi.gap_lower_bounds(square, g2d, 0.5)[0]
    log_q = lsi.log_conductances(square, g2d, 0.5)[0]
    truth = lsi.chain_gap(lsi.log_stationary(square, g2d)[0], square.edges, log_q)[0]
    assert ell[0] <= truth and ell[0] == pytest.approx(truth, rel=2e-6)


def test_staged_sturm_grid_equals_the_whole_grid():
    """The warm 1D gaps test the three middle points of STURM_GRID first and then only the points above or below
    them: the same certified value as the largest point of the whole grid with at most one eigenvalue below it,
    for gaps that moved by -30% .. +30% since the last check (outside -20% / +25%: recomputed), and below the
    dense gap: the largest grid point under it."""
    space = interval_space(-3.0, 3.0, 50)
    a = space.coords[:, 0]
    moved = np.array([0.7, 0.85, 0.97, 0.9997, 1.0002, 1.0004, 1.003, 1.2, 1.3])  # ell / previous
    g = np.stack([-(a - 0.2 * i) ** 2 / (0.4 + 0.05 * i) + 0.2 * np.sin(3 * a + i) for i in range(moved.size)])
    exact = _dense_gaps(space, g, 0.4)
    previous = exact / moved
    ell, _, recomputed = lsi.gap_lower_bounds(space, g, 0.4, previous=previous)
    diag, off = lsi.symmetrised_generator(space, g, 0.4)
    grid = previous[:, None] * lsi.STURM_GRID[None, :]
    ok = lsi.sturm_counts(diag, off, grid) <= 1
    inside = ok.any(axis=1) & ~ok[:, -1]
    assert np.array_equal(inside, (moved > 0.8) & (moved < 1.25)) and np.array_equal(recomputed, ~inside)
    whole = grid[np.arange(moved.size), ok.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)]
    assert np.array_equal(ell[inside], whole[inside])
    below = np.array([lsi.STURM_GRID[lsi.STURM_GRID < m].max(initial=0.0) for m in moved])  # grid points under ell
    assert np.all(ell <= exact) and np.array_equal(ell[inside], (previous * below)[inside])


def test_symmetrised_generator_from_the_flows_rates_equals_the_logs():
    """S from the flow's edge rates (sqrt(fwd bwd / (w_j w_k)), fwd / w_j, bwd / w_k) equals S formed in log space to
    a few ulps, for SG and SQRA on an interval and a rectangle; a state with a potential jump of 800 over one edge
    (SG: fwd bwd underflows) is formed from the logs."""
    rng = np.random.default_rng(5)
    for space in (interval_space(-3.0, 3.0, 40), rectangle_space((-2.0, -2.0), (2.0, 2.0), (6, 6))):
        g = rng.normal(size=(4, space.n_dofs)).cumsum(axis=1) - 3 * np.sum(space.coords ** 2, axis=1)
        g[3, : space.n_dofs // 2] += 800.0  # at least one edge jumps by ~800
        for scheme in ("sg", "sqra"):
            rates = edge_rates(space, g, 0.7, scheme)
            from_rates = lsi._symmetrised(space, g, 0.7, scheme, rates)
            logs = lsi._symmetrised(space, g, 0.7, scheme)
            for x, y in zip(from_rates[:2], logs[:2]):
                assert np.allclose(x[:3], y[:3], rtol=1e-13, atol=0)  # both to a few ulps of the exact entries
                if scheme == "sg":  # B(800) underflows: from the logs (SQRA's e^{+-400} does not)
                    assert np.array_equal(x[3], y[3])
                else:  # from the rates; the logs lose |log pi| ~ 800 ulps here
                    assert np.allclose(x[3], y[3], rtol=1e-12, atol=0)
            assert np.array_equal(from_rates[2], logs[2])
            if scheme == "sqra":  # closed form: S_jk = -tau omega_jk / sqrt(w_j w_k) whatever g
                j, k = space.edges[:, 0], space.edges[:, 1]
                closed = -0.7 * space.conductance / np.sqrt(space.weights[j] * space.weights[k])
                assert np.allclose(from_rates[1], closed[None, :], rtol=4e-15, atol=0)  # a few roundings


def _dense_gaps(space, g, tau):
    diag, off = lsi.symmetrised_generator(space, g, tau)
    j, k = space.edges[:, 0], space.edges[:, 1]
    out = []
    for s in range(g.shape[0]):
        S = np.diag(diag[s])
        S[j, k] = S[k, j] = off[s]
        out.append(np.linalg.eigvalsh(S)[1])
    return np.array(out)


def test_mirror_states_share_one_solve_and_stay_certified():
    """2D: a state whose potential is the point reflection (or an axis reflection) of another's takes that one's
    gap minus the Weyl-Gershgorin distance (one eigen-solve for the pair), within 1e-10 of its own gap and below the
    dense gap; a state that is not a mirror image (perturbed) is solved; symmetries are mesh automorphisms."""
    space = rectangle_space((-2.0, -2.0), (2.0, 2.0), (10, 10))
    sym = lsi.symmetries(space)
    assert sym.nodes.shape[0] == 7  # a square: the dihedral group without the identity
    edges = {tuple(e) for e in np.sort(space.edges, axis=1).tolist()}
    centre = 0.5 * (space.coords.min(axis=0) + space.coords.max(axis=0))
    for p, pe in zip(sym.nodes, sym.edges):
        image = {tuple(e) for e in np.sort(p[space.edges], axis=1).tolist()}
        assert image == edges and np.array_equal(np.sort(p[space.edges], axis=1), np.sort(space.edges[pe], axis=1))
        d = np.linalg.norm(space.coords - centre, axis=1)
        assert np.allclose(d[p], d)  # an isometry about the centre
    b = space.coords
    g0 = -np.sum((b - [0.4, -0.2]) ** 2 * [1.0, 1.6], axis=1) / 0.6 + 0.3 * np.sin(3 * b[:, 0] + b[:, 1])
    point, flip_x = sym.nodes[2], sym.nodes[0]  # -x and (-x0, x1)
    g = np.stack([g0, g0[point], g0[flip_x] + 0.7, g0 + 1e-3 * np.cos(5 * b[:, 1])])
    ell, vectors, recomputed = lsi.gap_lower_bounds(space, g, 0.5)
    exact = _dense_gaps(space, g, 0.5)
    assert np.all(ell <= exact) and np.allclose(ell, (1 - lsi.GAP_SAFETY) * exact, rtol=1e-10)
    assert recomputed[:3].sum() == 1 and recomputed[3]  # one solve for the three mirror images
    diag, off = lsi.symmetrised_generator(space, g, 0.5)
    j, k = space.edges[:, 0], space.edges[:, 1]
    for s in range(4):  # the mapped eigenvectors are eigenvectors (the tracker's next warm starts)
        S = np.diag(diag[s])
        S[j, k] = S[k, j] = off[s]
        assert np.linalg.norm(S @ vectors[s] - exact[s] * vectors[s]) <= 1e-8 * exact[s]
    tracker = lsi.GapTracker(space, 0.5)  # the tracker (and its Weyl reference) with mirror states
    assert np.allclose(tracker(g), ell, rtol=1e-12) and tracker.recomputed == 2
    assert np.array_equal(tracker.reference[2], tracker.previous)
