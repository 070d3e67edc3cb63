"""Regularity of ``Q^{pi_t}(s, .)`` and of the policy density on the action mesh, and the a-priori bounds.

Pure functions on arrays (``N`` states, ``M`` action DOFs); the ledger observer (:mod:`solver.ledger`) calls them
at every snapshot. Two families:

* **Measured.** A P1 field ``u`` ``(N, M)`` is recovered as a smooth function of the action:

  - 1D actions (a chain ``a_0 < ... < a_{M-1}``, any spacing): the gradient at a node is the three-point
    (non-uniform) second-order difference, one-sided second order at the two ends; the Hessian is twice the
    second divided difference ``2 u[a_{j-1}, a_j, a_{j+1}]`` (copied to the end nodes). Both are exact for
    quadratics. For the sup-norms the ledger uses the **mean-value** forms: the secant slopes
    ``(u_{j+1} - u_j) / h_j`` and the second divided differences, each of which equals ``u'(xi)`` (``u''(xi)``)
    at some ``xi`` of its stencil when ``u`` is the restriction of a smooth function. So ``max |secant| <=
    sup |u'|`` and ``[min, max]`` of the divided differences lies inside ``[inf u'', sup u'']`` exactly: a
    measured value above a proven bound of the continuum derivative is a bug, never a discretisation artefact.
  - 2D actions (a triangle mesh): per node, the least-squares quadratic fit ``u ~ c + g.(a - a_j) + (a - a_j)^T H
    (a - a_j) / 2`` over the node's patch (its mesh neighbours, grown by rings until it has at least 8
    nodes and the quadratic design full rank), exact for quadratics. The fit's pseudo-inverse per node depends on
    the mesh only (:func:`patch_fits`, computed once).

* **Bounds** (theory.md §10.3, §5.4), for the renormalised grid Gaussian ``K_x(s') ∝ exp(-(s' - x)^2 / 2
  sigma^2)`` on a 1D state grid, ``x = f(s, a)``. It is an exponential family in ``x / sigma^2``, so exactly, even
  on the truncated grid, ``d_x E_x V = Cov_x(s', V) / sigma^2`` and ``d_x^2 E_x V = E_x[(s' - m_x)^2 (V - E_x V)]
  / sigma^4``; Cauchy-Schwarz gives

      |d_a Q - d_a r|     <= gamma |d_a f| sd_x osc(V) / (2 sigma^2),
      |d_a^2 Q - d_a^2 r| <= gamma (|d_a^2 f| sd_x osc(V) / (2 sigma^2) + (d_a f)^2 Var_x osc(V) / sigma^4),

  with ``sd_x`` the exact standard deviation of ``K_x`` (:func:`kernel_moments`), and (§5.4) ``osc_a Q^{pi_t}
  <= osc_a r + gamma (max V* - min V^{pi_0})``. Along a monotone flow ``V^{pi_0} <= V^{pi_t} <= V*``, so
  ``osc V^{pi_t} <= max V* - min V^{pi_0}`` and all three bounds hold uniformly in ``t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .mdp import window_starts, window_values

#: Relative step of the central differences of the model's ``r`` and ``f`` in the action (bounds only): the
#: truncation error ``O(step^2)`` and the round-off ``eps / step^2`` of a second difference balance near 1e-4.
MODEL_STEP = 1e-4


# --- 1D actions ------------------------------------------------------------------------------------------------

def secant_slopes(a: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``(u_{j+1} - u_j) / (a_{j+1} - a_j)``: ``(..., M - 1)`` for nodes ``a (M,)`` increasing, ``u (..., M)``."""
    return np.diff(u, axis=-1) / np.diff(a)


def second_differences(a: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``2 u[a_{j-1}, a_j, a_{j+1}]``, ``(..., M - 2)``: the non-uniform three-point second derivative.

    Equals ``u''(xi)`` for some ``xi`` in ``[a_{j-1}, a_{j+1}]`` (mean-value theorem of divided differences);
    exact for quadratics; second-order accurate on a uniform grid.
    """
    s = secant_slopes(a, u)
    return 2.0 * np.diff(s, axis=-1) / (a[2:] - a[:-2])


def recovered_gradient_1d(a: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Node gradient ``(..., M)``: three-point non-uniform centred differences, one-sided second order at the ends.

    Exact for quadratics (so second order for smooth ``u``). Needs ``M >= 3``.
    """
    h = np.diff(a)
    s = secant_slopes(a, u)
    g = np.empty_like(u, dtype=float)
    hl, hr = h[:-1], h[1:]
    g[..., 1:-1] = (hr * s[..., :-1] + hl * s[..., 1:]) / (hl + hr)
    d2 = second_differences(a, u)
    g[..., 0] = s[..., 0] - 0.5 * d2[..., 0] * h[0]
    g[..., -1] = s[..., -1] + 0.5 * d2[..., -1] * h[-1]
    return g


def recovered_hessian_1d(a: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Node second derivative ``(..., M)``: :func:`second_differences`, copied to the two end nodes."""
    d2 = second_differences(a, u)
    return np.concatenate([d2[..., :1], d2, d2[..., -1:]], axis=-1)


# --- 2D actions ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchFits:
    """Per node ``j``: its patch ``nodes[j]`` (index array) and the ``(6, len)`` pseudo-inverse of the quadratic
    design ``[1, x, y, x^2/2, x y, y^2/2]`` in ``a - a_j`` (rows: value, gradient, Hessian entries)."""

    nodes: tuple
    pinv: tuple
    #: the nodes grouped by patch size: ``((node indices (G,), patches (G, k), pseudo-inverses (G, 6, k)), ...)``
    groups: tuple = field(default=(), compare=False)


def patch_fits(coords: np.ndarray, edges: np.ndarray, min_nodes: int = 8) -> PatchFits:
    """:class:`PatchFits` of a 2D mesh ``coords (M, 2)``, ``edges (E, 2)``: one ring, two where it is too small."""
    m = coords.shape[0]
    neighbours = [set() for _ in range(m)]
    for j, k in edges:
        neighbours[j].add(int(k))
        neighbours[k].add(int(j))
    nodes, pinv = [], []
    for j in range(m):
        patch = {j} | neighbours[j]
        for _ in range(4):  # grow by rings until the quadratic design has full rank (corners need it)
            idx = np.array(sorted(patch))
            d = coords[idx] - coords[j]
            x, y = d[:, 0], d[:, 1]
            design = np.stack([np.ones_like(x), x, y, 0.5 * x * x, x * y, 0.5 * y * y], axis=1)
            if len(patch) >= min_nodes and np.linalg.matrix_rank(design) == 6:
                break
            for k in list(patch):
                patch |= neighbours[k]
        nodes.append(idx)
        pinv.append(np.linalg.pinv(design))
    sizes = np.array([len(idx) for idx in nodes])
    groups = tuple((np.flatnonzero(sizes == k), np.stack([nodes[j] for j in np.flatnonzero(sizes == k)]),
                    np.stack([pinv[j] for j in np.flatnonzero(sizes == k)])) for k in np.unique(sizes))
    return PatchFits(nodes=tuple(nodes), pinv=tuple(pinv), groups=groups)


def recovered_2d(fits: PatchFits, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient ``(N, M, 2)`` and Hessian ``(N, M, 2, 2)`` of ``u (N, M)`` by the patch fits (exact for quadratics).

    The nodes are processed in groups of equal patch size (:attr:`PatchFits.groups`: one contraction per group
    instead of one small product per node; measured on lqr_2d_action, 41 x 1201: 12 ms -> 3 ms a call); the sums
    over a patch in another order than the per-node BLAS product: the same values to round-off.
    """
    n, m = u.shape
    c = np.empty((n, m, 6))
    if fits.groups:
        for idx, patches, pinv in fits.groups:
            c[:, idx] = np.einsum("ngk,gck->ngc", u[:, patches], pinv)
    else:
        for j in range(m):
            c[:, j] = u[:, fits.nodes[j]] @ fits.pinv[j].T  # (N, 6)
    grad = c[:, :, 1:3].copy()
    hess = np.empty((n, m, 2, 2))
    hess[..., 0, 0], hess[..., 0, 1], hess[..., 1, 1] = c[..., 3], c[..., 4], c[..., 5]
    hess[..., 1, 0] = c[..., 4]
    return grad, hess


def symmetric_2x2_eigenvalues(hess: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues ``(..., 2)`` of the symmetric ``(..., 2, 2)`` matrices ``[[a, b], [b, d]]`` in closed
    form, ``(a + d) / 2 -+ hypot((a - d) / 2, b)``: absolute error ``~eps (|a| + |b| + |d|)``, as LAPACK's (and
    ~40x cheaper than ``np.linalg.eigvalsh`` on ``41 x 1201`` matrices)."""
    a, b, d = hess[..., 0, 0], hess[..., 0, 1], hess[..., 1, 1]
    mean = 0.5 * (a + d)
    radius = np.hypot(0.5 * (a - d), b)
    return np.stack([mean - radius, mean + radius], axis=-1)


# --- per-state quantities ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Derivatives:
    """Per state ``(N,)``: ``grad_sup = sup_a |grad_a u|``, ``hess_min`` / ``hess_max`` = smallest / largest
    Hessian eigenvalue over the nodes, ``osc = max_a u - min_a u``."""

    grad_sup: np.ndarray
    hess_min: np.ndarray
    hess_max: np.ndarray
    osc: np.ndarray


def derivatives(space, u: np.ndarray, fits: PatchFits | None = None) -> Derivatives:
    """:class:`Derivatives` of ``u (N, M)`` on the action space (1D: mean-value forms; 2D: patch fits)."""
    osc = u.max(axis=1) - u.min(axis=1)
    if space.dim == 1:
        a = space.coords[:, 0]
        d2 = second_differences(a, u)
        return Derivatives(np.abs(secant_slopes(a, u)).max(axis=1), d2.min(axis=1), d2.max(axis=1), osc)
    fits = fits if fits is not None else patch_fits(space.coords, space.edges)
    grad, hess = recovered_2d(fits, u)
    eig = symmetric_2x2_eigenvalues(hess)  # (N, M, 2) ascending
    return Derivatives(np.sqrt((grad ** 2).sum(-1)).max(axis=1), eig[..., 0].min(axis=1), eig[..., 1].max(axis=1),
                       osc)


def semiconvexity(space, Q: np.ndarray, tau: float, log_mu: np.ndarray, fits: PatchFits | None = None) -> np.ndarray:
    """``min_a lambda_min(Hess_a (-Q / tau + U))`` per state, ``U = -log mu``, ``(N,)`` (theory.md §5.4: the
    Bakry-Emery constant; for LQR with Lebesgue ``mu`` it is ``2 alpha / tau``)."""
    psi = -Q / tau - log_mu[None, :]
    return derivatives(space, psi, fits).hess_min


def _cells_1d(space):
    a = space.coords[:, 0]
    return np.arange(a.size - 1), np.diff(a)


def log_linear_fisher(space, log_p: np.ndarray, log_ref: np.ndarray | None = None,
                      mass: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fisher information ``I = int p |grad log(p / ref)|^2 = 4 ||grad sqrt(p / ref)||^2_{ref}`` of the
    log-linear interpolant of ``p``, and ``sup |grad log(p / ref)|``, per state ``(N,)`` (``ref = 1`` if None).

    1D: on each cell ``log p`` is linear, so ``grad log p`` is the secant slope and the cell's mass is exactly
    ``h L(p_j, p_k)`` (``L`` the logarithmic mean). 2D: ``grad log p`` is the P1 gradient on each triangle and the
    cell mass is ``area * mean(p at its vertices)`` (second order). For a Gaussian the 1D value is ``1/Sigma`` up
    to ``O(h^2)``. ``log_p = -inf`` (a zero density) makes the gradient infinite: the quantity says so.

    ``mass``: :func:`cell_masses` of ``log_p`` when the caller has it (the ledger takes ``I(p)`` and ``I(p | G)`` of
    the same ``p``: the cell masses, one exponential per DOF, are computed once).
    """
    lp = log_p if log_ref is None else log_p - log_ref
    mass = cell_masses(space, log_p) if mass is None else mass
    if space.dim == 1:
        _, h = _cells_1d(space)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            slope = np.diff(lp, axis=1) / h
            fisher = np.nansum(np.where(mass > 0, slope ** 2 * mass, 0.0), axis=1)
            sup = np.where(np.isneginf(lp).any(axis=1), np.inf, np.nanmax(np.abs(slope), axis=1))
        return fisher, sup
    cells = space.cells
    x = space.coords[cells]  # (C, 3, 2)
    e1, e2 = x[:, 1] - x[:, 0], x[:, 2] - x[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    # the P1 gradient g solves J g = (v1 - v0, v2 - v0) with the rows of J the edge vectors e1, e2:
    # g = J^{-1} d, J^{-1} = [[e2_y, -e1_y], [-e2_x, e1_x]] / det (exact for linear functions on any triangle,
    # tests/test_observers_cost.py)
    inv = np.stack([np.stack([e2[:, 1], -e1[:, 1]], -1), np.stack([-e2[:, 0], e1[:, 0]], -1)], 1) / det[:, None, None]
    v0, v1, v2 = lp[:, cells[:, 0]], lp[:, cells[:, 1]], lp[:, cells[:, 2]]  # (N, C) each: all states at once
    with np.errstate(invalid="ignore", over="ignore"):
        d1, d2 = v1 - v0, v2 - v0  # the edge differences
        g0 = inv[:, 0, 0] * d1 + inv[:, 0, 1] * d2
        g1 = inv[:, 1, 0] * d1 + inv[:, 1, 1] * d2
        g2 = g0 * g0 + g1 * g1
        fisher = np.nansum(np.where(mass > 0, g2 * mass, 0.0), axis=1)
        sup = np.sqrt(g2.max(axis=1))
    return fisher, sup


def cell_masses(space, log_p: np.ndarray) -> np.ndarray:
    """The cell masses of the log-linear interpolant of ``p = exp(log_p)`` (``(N, M)``) used by
    :func:`log_linear_fisher`: 1D ``h (p_k - p_j) / (log p_k - log p_j)`` (``h exp((log p_j + log p_k) / 2)``
    where the logs differ by less than 1e-8), ``(N, M - 1)``; 2D ``area * mean(p at the vertices)``, ``(N, C)``.
    One exponential per DOF (and per 1D cell with nearly equal logs)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        p = np.exp(log_p)
        if space.dim == 1:
            _, h = _cells_1d(space)
            l0, l1 = log_p[:, :-1], log_p[:, 1:]
            d = l1 - l0
            small = np.abs(d) < 1e-8
            mass = (p[:, 1:] - p[:, :-1]) / np.where(small, 1.0, d)
            if small.any():
                mass[small] = np.exp(0.5 * (l0 + l1))[small]
            mass *= h
            return mass
        cells = space.cells
        x = space.coords[cells]
        e1, e2 = x[:, 1] - x[:, 0], x[:, 2] - x[:, 0]
        area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
        return area * ((p[:, cells[:, 0]] + p[:, cells[:, 1]] + p[:, cells[:, 2]]) / 3.0)


# --- a-priori bounds -------------------------------------------------------------------------------------------

#: Rows of ``(mean, action)`` windows per chunk of :func:`kernel_moments` (``8 rows M L`` bytes of windows each).
MOMENT_CHUNK_BYTES = 32 * 2 ** 20


def kernel_moments(states: np.ndarray, mean: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ``s'`` under every row of the renormalised grid Gaussian of
    :class:`solver.mdp.GaussianGridKernel` (the same windows, :func:`solver.mdp.window_starts` /
    :func:`~solver.mdp.window_values`) with next-state means ``mean`` ``(N, A)``, each ``(N, A)``.

    Computed centred, window by window (exact up to round-off; no ``E s^2 - (E s)^2`` cancellation), in chunks of
    states, without building the kernel's sparse matrix: at 241 states x 2049 actions (the nodes and midpoints of
    1025 DOFs, window 111) 1.0 s instead of 13.7 s for the kernel and its CSR moments (measured on 2 cores).
    """
    s = np.asarray(states, dtype=float)
    E, var = np.empty(mean.shape), np.empty(mean.shape)
    _, width = window_starts(s, mean[:1, :1], sigma)
    rows = max(1, MOMENT_CHUNK_BYTES // (8 * width * max(1, mean.shape[1])))
    for a in range(0, mean.shape[0], rows):
        f = np.ascontiguousarray(mean[a:a + rows])
        start, _ = window_starts(s, f, sigma)
        w = window_values(s, f, start, width, sigma)
        x = s[start[..., None] + np.arange(width)]
        e = np.einsum("...k,...k->...", w, x)
        x -= e[..., None]
        x *= x
        E[a:a + rows] = e
        var[a:a + rows] = np.einsum("...k,...k->...", w, x)
    return E, np.maximum(var, 0.0)


def _model_derivatives(fn, s: np.ndarray, a: np.ndarray, scale: float):
    """``fn``, ``d_a fn`` and ``d_a^2 fn`` on ``(N, 1) x (1, M)`` by central differences of step ``MODEL_STEP
    scale``."""
    d = MODEL_STEP * scale
    f0 = np.asarray(fn(s, a), float)
    fp = np.asarray(fn(s, a + d), float)
    fm = np.asarray(fn(s, a - d), float)
    return f0, (fp - fm) / (2 * d), (fp - 2 * f0 + fm) / (d * d)


@dataclass(frozen=True)
class Bounds:
    """A-priori bounds per state ``(N,)`` (module docstring): ``dQ`` on ``sup_a |d_a Q|``, ``d2Q`` on
    ``sup_a |d_a^2 Q|``, ``oscQ`` on ``osc_a Q``; ``osc_V`` the bound on ``osc V^{pi_t}`` used. NaN where not derived
    (2D actions or states, a non-Gaussian kernel). ``parts``: the pieces ``(|d_a r|, c1, |d_a^2 r|, c2, osc_a r,
    gamma)`` (``(N, 2M - 1)`` on nodes and midpoints) from which :meth:`at` recomputes them for a larger ``osc V``."""

    dQ: np.ndarray
    d2Q: np.ndarray
    oscQ: np.ndarray
    osc_V: float
    parts: tuple | None = None  # (|d_a r|, c1, |d_a^2 r|, c2, osc_a r, gamma): bound = max_a(|r'| + c osc_V)

    def at(self, osc_V: float) -> "Bounds":
        """The same bounds with a larger ``osc V`` (a non-monotone flow: ``V^{pi_t}`` below ``min V^{pi_0}``), with
        the arithmetic of :func:`apriori_bounds`: bit for bit the bounds it computes with that ``osc V``."""
        if osc_V <= self.osc_V or self.parts is None:
            return self
        dr, c1, d2r, c2, osc_r, gamma = self.parts
        nan = np.full(osc_r.shape, math.nan)
        return Bounds((dr + c1 * osc_V).max(axis=1) if dr is not None else nan,
                      (d2r + c2 * osc_V).max(axis=1) if d2r is not None else nan,
                      osc_r + gamma * osc_V, osc_V, self.parts)


def apriori_bounds(model, mdp, V_star: np.ndarray, V_initial: np.ndarray, gaussian: bool) -> Bounds:
    """:class:`Bounds` for ``model`` on ``mdp`` with ``osc V <= max V* - min V^{pi_0}`` (theory.md §10.3, §5.4).

    The sups over actions are taken over the nodes and the cell midpoints. ``gaussian``: the kernel is the
    renormalised grid Gaussian (:class:`solver.mdp.GaussianGridKernel`); otherwise only the oscillation bound
    (kernel-independent) is given.
    """
    osc_V = float(np.max(V_star) - np.min(V_initial))
    n, m = mdp.reward.shape
    osc_r = mdp.reward.max(axis=1) - mdp.reward.min(axis=1)
    osc_bound = osc_r + mdp.gamma * osc_V
    nan = np.full(n, math.nan)
    plain = (None, None, None, None, osc_r, mdp.gamma)
    if mdp.space.dim != 1 or mdp.states.ndim != 1:
        return Bounds(nan, nan, osc_bound, osc_V, plain)
    a = mdp.space.coords[:, 0]
    a_all = np.sort(np.concatenate([a, 0.5 * (a[1:] + a[:-1])]))[None, :]
    s = mdp.states[:, None]
    scale = float(a[-1] - a[0])
    _, dr, d2r = _model_derivatives(model.reward, s, a_all, scale)
    dr = np.abs(np.broadcast_to(dr, (n, a_all.size)))
    d2r = np.abs(np.broadcast_to(d2r, (n, a_all.size)))
    if model.single_state:
        zero = np.zeros_like(dr)
        return Bounds(dr.max(axis=1), d2r.max(axis=1), osc_bound, osc_V, (dr, zero, d2r, zero, osc_r, mdp.gamma))
    if not gaussian:
        return Bounds(nan, nan, osc_bound, osc_V, plain)
    x, df, d2f = _model_derivatives(model.dynamics, s, a_all, scale)
    x = np.broadcast_to(x, (n, a_all.size))
    sigma = float(model.sigma)
    _, var = kernel_moments(mdp.states, x, sigma)
    sd = np.sqrt(var)
    c1 = mdp.gamma * np.abs(df) * sd / (2 * sigma ** 2)
    c2 = mdp.gamma * (np.abs(d2f) * sd / (2 * sigma ** 2) + df ** 2 * var / sigma ** 4)
    return Bounds((dr + c1 * osc_V).max(axis=1), (d2r + c2 * osc_V).max(axis=1), osc_bound, osc_V,
                  (dr, c1, d2r, c2, osc_r, mdp.gamma))


def holley_stroock(space, osc_Q: np.ndarray, tau: float) -> np.ndarray:
    """``C_LSI(mu) exp(-osc_a Q / tau)`` per state (theory.md §5.4) for Lebesgue ``mu`` on an interval of length
    ``L`` (``C_LSI = pi^2 / L^2``, the uniform measure, §7.4); NaN for 2D actions."""
    if space.dim != 1:
        return np.full(osc_Q.shape, math.nan)
    length = float(space.coords[:, 0].max() - space.coords[:, 0].min())
    with np.errstate(under="ignore"):
        return (math.pi / length) ** 2 * np.exp(-osc_Q / tau)


def power_law(h: np.ndarray, values: np.ndarray) -> float:
    """The least-squares exponent ``p`` of ``values ~ C h^p`` (``log``-``log``); NaN with fewer than two points."""
    h, v = np.asarray(h, float), np.abs(np.asarray(values, float))
    ok = (h > 0) & (v > 0) & np.isfinite(v)
    if ok.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log(h[ok]), np.log(v[ok]), 1)[0])
