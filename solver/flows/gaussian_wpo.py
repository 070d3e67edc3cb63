"""``flow.kind = "gaussian_wpo"``: parametric Gaussian WPO, the Bures-Wasserstein projection of the WPG flow.

Per state ``s`` the policy is a Gaussian ``N(m_s, Sigma_s)`` on ``R^d`` (``d = 1, 2``; ``flow.covariance`` =
"full" or "diagonal"), moved by the Wasserstein gradient flow of ``F = -E_pi[Q] + tau KL(pi || mu)`` restricted
to Gaussians (theory.md §10.4; the algorithm it idealises is WPO, theory.md §3):

    dm/dt     = E_pi[grad_a g],       g = Q^{pi_t}(s, .) - tau U        (U = -log mu),
    dSigma/dt = H Sigma + Sigma H + 2 tau I,      H = E_pi[Hess_a g]    (diagonal family: diag(H), the same ODE).

With ``flow.entropy = false`` the ``tau`` terms are dropped (``g = Q``, no ``2 tau I``): that is what the acme
agent's WPO loss with its natural-gradient adaptor computes with exact expectations, ``dm/dt = E[dQ]`` and
``d sigma/dt = sigma E[d^2 Q]`` per dimension, i.e. ``dSigma/dt = 2 E[Q''] Sigma``: on a concave ``Q`` the variance
collapses (at rate ``2 |E[Q'']| = 4 alpha_K`` for LQR, theory.md §7.2).

**Expectations** are exact Gaussian expectations by Gauss-Hermite quadrature (:data:`HERMITE_NODES` nodes per
dimension, a tensor rule in 2D) at the nodes ``a = m + L z`` (``Sigma = L L^T``), with Stein's identities so that
only values of ``g`` are needed (no derivative of ``Q``):

    E[grad g] = L^{-T} E[z g],      E[Hess g] = L^{-T} E[(z z^T - I) g] L^{-1}.

``Q`` at the nodes is re-evaluated exactly at every stage from the current ``V^{pi_t}`` on the state grid,
``Q(s, a) = r(s, a) + gamma sum_k T(s_k | f(s, a)) V_k``, with the model's reward and dynamics and the same
renormalised grid Gaussian kernel as :func:`solver.mdp.build_mdp` (so at the action DOFs it is ``Q^pi``
exactly). The quadrature is exact for polynomial ``g`` of degree ``<= 2 n - 3`` (LQR: quadratic).

**Representation.** ``(m, Sigma)`` is the flow's own state; the policy handed to the Bellman solver and all
diagnostics is the density of ``N(m, Sigma)`` at the action DOFs renormalised on the domain
(``p_j ∝ exp(-(a_j - m)^T Sigma^{-1} (a_j - m) / 2)``, log-sum-exp normalised), so everything downstream is
unchanged. The dynamics are those of the untruncated Gaussian: they describe the computed policy as long as the
Gaussian mass outside the action domain is negligible (reported as ``max_truncated_mass`` in the summary).

**Time step: ETDRK4 (fourth order), exponential Euler as the SPD safeguard.** The right-hand side is split into
a linear part frozen at the start of the step, ``L(m, Sigma) = (H- m, H- Sigma + Sigma H-)`` with ``H-`` the
concave part of ``H_n`` (its eigenvalues ``min(lam, 0)``), and the rest ``N = F - L`` (``F`` the velocity above,
with ``Q`` re-evaluated at each stage). In the eigenbasis of ``H_n`` the operator ``L`` is entrywise (eigenvalues
``lam-_i`` for the mean, ``lam-_i + lam-_j`` for the covariance), so the Cox-Matthews exponential Runge-Kutta
scheme of order four (:func:`etdrk4_step`) needs only entrywise ``phi`` functions, and ``e^{hL}`` never grows. It
costs three extra Bellman evaluations per step (stages at ``t + h/2``, ``t + h/2``, ``t + h``). When ``Q`` does not
depend on the policy and is quadratic and concave in ``a`` (one-state quadratic bandit, the OU flow of theory.md
§7.3) ``N`` is constant and the step is exact in time for every ``h``. On LQR (theory.md §7.2) its error against
the closure ODEs is fourth order (measured 1.5e-4, 1.2e-5, 7.5e-7 at ``dt`` = 0.08, 0.04, 0.02).

Why a safeguard: ETDRK4 does not keep ``Sigma`` SPD for every ``h`` (a stage is a linear combination with
negative weights). If a stage or the result is not SPD (or not finite), the step is redone as exponential Euler
with ``Q`` frozen at ``t_n`` (:func:`exponential_step`): ``m_{n+1} = m_n + h phi_1(h H-) G_n``,
``Sigma_{n+1} = F Sigma_n F + 2 tau h phi_1(2 h H-)`` with ``F = e^{h H-} (I + h H+)`` (``2 tau h phi_1(2 h H-) =
2 tau int_0^h e^{2 u H-} du``): a congruence of an SPD matrix by a non-singular matrix plus a PSD one, hence SPD for
every ``h`` (also with ``tau = 0``); first order, and exact for frozen quadratic concave ``Q`` as well. The number
of such steps is ``fallback_steps`` in the summary (LQR at ``dt = 0.25``: one, the first, at the edge states of
the state grid). Large steps stay finite and SPD but are not accurate where ``Q`` is far from quadratic over a step
(the double well at ``dt >= 1``): the step size is about accuracy, never about stability or positivity. Unlike the
implicit-Euler WPG step, no step here is a Markov kernel with the Gibbs policy invariant, so ``J`` is monotone only
up to the time error (it is on the tested runs: LQR and double well at ``dt <= 0.5``).

**Collapse.** Without entropy the variance decays exponentially (to 0 as ``t -> infinity``). Stein's Hessian
divides values of ``Q`` by ``Sigma``, so its relative round-off error is ``~ 1e-16 |Q| / (|Q''| Sigma)``; the flow
stops (:meth:`GaussianWPO.more`) once an eigenvalue of some ``Sigma_s`` is below :data:`COLLAPSED_VARIANCE` times the
squared diameter of the action domain, and the summary gives the time (``collapsed_at``).

**Dissipation.** ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D`` with the exact statewise
``D(s) = sum_j w_j (d_t p_sj) (Q_sj - tau log(p_sj / mu_j))`` of the computed (renormalised) density, whose time
derivative follows from ``(dm/dt, dSigma/dt)`` (:func:`density_rate`). For the untruncated Gaussian
``D = |dm/dt|^2 + tr(A Sigma A)`` with ``A = H + tau Sigma^{-1}``, the squared W2 speed (theory.md §7.2 for LQR).

**Asymptotic rate.** When the Gibbs optimum is Gaussian (LQR) the projection is exact and the linearised step
near it is exact in time, so the gap rate is the continuous-time one, ``2 min_s min eig(-H_s)`` at the limit
(``4 alpha``; :meth:`GaussianWPO.predicted_rate`). Otherwise the gap tends to the projection gap
``J* - J*_Gauss > 0``, not to zero, and no rate is predicted (the summary then says so).
"""

from __future__ import annotations

import math

import numpy as np

from ..config import ConfigError
from ..mdp import GaussianGridKernel2D, grid_axes, window_starts, window_values
from .base import Flow, FlowState, NumericalError, evaluate_checked

#: Gauss-Hermite nodes per action dimension. The rule is exact for polynomials of degree ``2 n - 1`` in ``z``, so
#: Stein's Hessian formula is exact for ``g`` of degree ``2 n - 3``; beyond that (Q of the renormalised kernel,
#: non-polynomial) 20 nodes in 1D and 12 per axis in 2D put the quadrature error below 1e-12 on the shipped
#: models (tested against 40-node rules in tests/test_gaussian_wpo.py).
HERMITE_NODES = {1: 20, 2: 12}

#: The flow has reached its limit when its last ``dJ/dt`` is below this fraction of ``max(1, |J|)``: near a
#: non-degenerate limit ``J*_Gauss - J ~ (dJ/dt) / rate``, so with rates >= 1e-2 the last ``J`` is ``J*_Gauss`` to
#: about 1e-7 relative, below any projection gap worth reporting (double well: 1e-2 relative).
STATIONARY_TOLERANCE = 1e-9

#: The projection is exact (the gap tends to 0, and the rate prediction applies) when ``J* - J*_Gauss`` is
#: below this fraction of ``max(1, |J*|)`` at a stationary end point: above round-off and the action quadrature
#: error of the evaluation (1e-9 on the tested LQR grids), far below any real projection gap (double well: 0.2).
EXACT_PROJECTION = 1e-8


#: The flow stops when an eigenvalue of some ``Sigma_s`` falls below this times the squared diameter of the action
#: domain (std 1e-5 of the diameter): Stein's Hessian then still has ~1e-6 relative round-off (module docstring).
COLLAPSED_VARIANCE = 1e-10

#: Gaussian mass outside the action domain above which the summary warns. The flow's limit then differs from the
#: discrete optimum at that state by O(mass) in the policy, hence O(mass^2) in J (first-order optimality): 1e-4
#: keeps that below 1e-8 relative.
VISIBLE_TRUNCATION = 1e-4


def small_inverse(X: np.ndarray) -> np.ndarray:
    """Inverses of a stack ``(N, d, d)`` of ``1 x 1`` or ``2 x 2`` matrices in closed form (adjugate / determinant;
    LAPACK's per-matrix calls cost far more than the arithmetic here).

    >>> small_inverse(np.array([[[2.0, 1.0], [1.0, 1.0]]])).tolist()
    [[[1.0, -1.0], [-1.0, 2.0]]]
    """
    if X.shape[-1] == 1:
        return 1.0 / X
    a, b, c, d = X[:, 0, 0], X[:, 0, 1], X[:, 1, 0], X[:, 1, 1]
    det = a * d - b * c
    return np.stack([np.stack([d, -b], axis=-1), np.stack([-c, a], axis=-1)], axis=-2) / det[:, None, None]


def hermite_rule(dim: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite rule for ``N(0, I_dim)``: nodes ``(K, dim)`` and weights ``(K,)`` summing to 1 (``K = n^dim``).

    >>> z, w = hermite_rule(1, 3)
    >>> round(float(w @ z[:, 0] ** 2), 12), round(float(w @ z[:, 0] ** 4), 12)
    (1.0, 3.0)
    """
    x, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / math.sqrt(2 * math.pi)
    if dim == 1:
        return x[:, None], w
    nodes = np.stack(np.meshgrid(x, x, indexing="ij"), axis=-1).reshape(-1, 2)
    return nodes, np.outer(w, w).ravel()


def stein_moments(values: np.ndarray, z: np.ndarray, w: np.ndarray, chol_inv: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``E[grad g]`` and ``E[Hess g]`` under ``N(m, L L^T)`` from values of ``g`` at ``m + L z`` (Stein).

    Args:
        values: ``(N, K)`` values of ``g`` at the nodes of each state.
        z, w: the rule of :func:`hermite_rule`, ``(K, d)`` and ``(K,)``.
        chol_inv: ``(N, d, d)`` ``L^{-1}``.

    Returns:
        ``(N, d)`` gradient and ``(N, d, d)`` symmetric Hessian expectations.

    >>> z, w = hermite_rule(1, 4)
    >>> g = -(0.5 + 2.0 * z[:, 0]) ** 2   # g(a) = -a^2 at a = 0.5 + 2 z: E[g'] = -1, E[g''] = -2
    >>> grad, hess = stein_moments(g[None], z, w, np.array([[[0.5]]]))
    >>> round(float(grad[0, 0]), 12), round(float(hess[0, 0, 0]), 12)
    (-1.0, -2.0)
    """
    d = z.shape[1]
    weighted = values * w
    mean = weighted.sum(axis=1)
    ez = weighted @ z  # (N, d): E[z g]
    ezz = np.einsum("nk,ki,kj->nij", weighted, z, z) - mean[:, None, None] * np.eye(d)
    grad = np.einsum("nji,nj->ni", chol_inv, ez)  # L^{-T} E[z g]
    hess = np.einsum("nai,nab,nbj->nij", chol_inv, ezz, chol_inv)
    return grad, 0.5 * (hess + np.swapaxes(hess, 1, 2))


def exponential_step(m: np.ndarray, S: np.ndarray, G: np.ndarray, H: np.ndarray, h: float,
                     tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Exponential Euler with ``(G, H)`` frozen: the SPD-safe step (module docstring).

    With ``H = V diag(lam) V^T`` split into its concave part ``lam- = min(lam, 0)`` (solved exactly) and its convex
    part ``lam+ = max(lam, 0)`` (explicit: no exponential growth over a long step),

        m_{n+1} = m_n + h phi_1(h H-) G,     S_{n+1} = F S_n F + 2 tau h phi_1(2 h H-),    F = e^{h H-} (I + h H+).

    ``S_{n+1}`` is a congruence of an SPD matrix by a non-singular ``F`` plus a PSD matrix: SPD for every ``h``
    (also with ``tau = 0``), and nothing overflows. First order; exact when ``Q`` is frozen, quadratic and concave
    (``H <= 0``: the OU flow). Shapes: ``m, G`` ``(N, d)``; ``S, H`` ``(N, d, d)`` symmetric.

    >>> m, S = exponential_step(np.array([[1.0]]), np.array([[[1.0]]]), np.array([[-2.0]]), np.array([[[-2.0]]]),
    ...                         0.5, 1.0)   # OU: k = 2, tau = 1 from N(1, 1)
    >>> round(float(m[0, 0]), 12) == round(math.exp(-1.0), 12), round(float(S[0, 0, 0]), 12) == round(
    ...     0.5 + 0.5 * math.exp(-2.0), 12)
    (True, True)
    """
    lam, vec = np.linalg.eigh(H)
    neg, pos = np.minimum(lam, 0.0), np.maximum(lam, 0.0)
    phi_m = phi_functions(h * neg)[0]
    phi_S = phi_functions(2 * h * neg)[0]
    coef = np.einsum("nji,nj->ni", vec, G) * (h * phi_m)
    m_new = m + np.einsum("nij,nj->ni", vec, coef)
    F = np.einsum("nij,nj,nkj->nik", vec, np.exp(h * neg) * (1 + h * pos), vec)
    S_new = F @ S @ F + 2 * tau * np.einsum("nij,nj,nkj->nik", vec, h * phi_S, vec)
    return m_new, 0.5 * (S_new + np.swapaxes(S_new, 1, 2))


def phi_functions(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``phi_k(c) = sum_j c^j / (j + k)!`` for ``k = 1, 2, 3``, elementwise (Taylor series for ``|c| < 1``, where the
    closed forms ``phi_1 = (e^c - 1)/c``, ``phi_{k+1} = (phi_k - 1/k!)/c`` cancel).

    >>> [round(float(f[0]), 12) for f in phi_functions(np.array([0.0]))]
    [1.0, 0.5, 0.166666666667]
    """
    c = np.asarray(c, dtype=float)
    big = np.abs(c) >= 1.0
    cb = np.where(big, c, 1.0)
    p1 = np.expm1(cb) / cb
    p2 = (p1 - 1.0) / cb
    p3 = (p2 - 0.5) / cb
    cs = np.where(big, 0.0, c)
    series = [np.zeros_like(cs) for _ in range(3)]
    term = np.ones_like(cs)  # c^j / j!
    for j in range(18):  # |c| < 1: the remainder is below 1 / 18! ~ 2e-16
        for k in range(3):
            series[k] += term * (math.factorial(j) / math.factorial(j + k + 1))
        term = term * cs / (j + 1)
    return tuple(np.where(big, closed, sr) for closed, sr in zip((p1, p2, p3), series))


def etdrk4_step(m: np.ndarray, S: np.ndarray, H: np.ndarray, velocity0: tuple[np.ndarray, np.ndarray],
                velocity, h: float) -> tuple[np.ndarray, np.ndarray]:
    """One Cox-Matthews ETDRK4 step of ``(dm/dt, dS/dt) = F(m, S)`` with the linear part frozen at ``H``.

    The linear part is ``L(m, S) = (H- m, H- S + S H-)`` with ``H- = V diag(min(lam, 0)) V^T`` the concave part of
    ``H = V diag(lam) V^T`` (the convex part goes into the remainder, so ``e^{hL}`` never grows); in that eigenbasis
    ``L`` acts entrywise with eigenvalues ``lam-_i`` (mean) and ``lam-_i + lam-_j`` (covariance), so every ``phi``
    function is entrywise.
    The remainder ``N = F - L`` is evaluated at the four stages (``velocity(m, S, dt)`` gives ``F`` at the policy
    ``(m, S)``, time ``t_n + dt``). For frozen quadratic ``Q`` ``N`` is constant and the step is exact; otherwise it
    is fourth order. Shapes as in :func:`exponential_step`.
    """
    lam, vec = np.linalg.eigh(H)
    lam = np.minimum(lam, 0.0)  # the convex directions go to N: e^{hL} never grows
    vt = np.swapaxes(vec, 1, 2)

    def to_eig(dm, dS):
        return np.einsum("nij,nj->ni", vt, dm), vt @ dS @ vec

    def from_eig(x, X):
        return np.einsum("nij,nj->ni", vec, x), vec @ X @ vt

    c_m = h * lam
    c_S = h * (lam[:, :, None] + lam[:, None, :])
    e_m, e_S, eh_m, eh_S = np.exp(c_m), np.exp(c_S), np.exp(0.5 * c_m), np.exp(0.5 * c_S)
    ph_m, ph_S = phi_functions(0.5 * c_m)[0], phi_functions(0.5 * c_S)[0]
    (p1m, p2m, p3m), (p1S, p2S, p3S) = phi_functions(c_m), phi_functions(c_S)
    b1 = (p1m - 3 * p2m + 4 * p3m, p1S - 3 * p2S + 4 * p3S)
    b2 = (2 * p2m - 4 * p3m, 2 * p2S - 4 * p3S)
    b4 = (4 * p3m - p2m, 4 * p3S - p2S)
    lam_S = lam[:, :, None] + lam[:, None, :]

    def remainder(x, X, F):  # N = F - L u, in the eigenbasis
        fm, fS = to_eig(*F)
        return fm - lam * x, fS - lam_S * X

    def half(x, X, n):  # e^{hL/2} u + (h/2) phi_1(hL/2) n
        return eh_m * x + 0.5 * h * ph_m * n[0], eh_S * X + 0.5 * h * ph_S * n[1]

    u = to_eig(m, S)
    n_u = remainder(*u, velocity0)
    a = half(*u, n_u)
    n_a = remainder(*a, velocity(*from_eig(*a), 0.5 * h))
    b = half(*u, n_a)
    n_b = remainder(*b, velocity(*from_eig(*b), 0.5 * h))
    c = half(*a, (2 * n_b[0] - n_u[0], 2 * n_b[1] - n_u[1]))
    n_c = remainder(*c, velocity(*from_eig(*c), h))
    x = e_m * u[0] + h * (b1[0] * n_u[0] + b2[0] * (n_a[0] + n_b[0]) + b4[0] * n_c[0])
    X = e_S * u[1] + h * (b1[1] * n_u[1] + b2[1] * (n_a[1] + n_b[1]) + b4[1] * n_c[1])
    m_new, S_new = from_eig(x, X)
    return m_new, 0.5 * (S_new + np.swapaxes(S_new, 1, 2))


def reference_quadratic(log_mu: np.ndarray, coords: np.ndarray) -> tuple[float, float]:
    """``(c0, c2)`` with ``log mu(a) = c0 + c2 |a|^2`` exactly at the DOFs (Lebesgue: 0, 0; Gaussian: ``-1/(2 std^2)``).

    Raises:
        ConfigError: if ``log mu`` is not of that form (the flow needs ``U`` at arbitrary actions).
    """
    design = np.stack([np.ones(len(coords)), np.sum(coords ** 2, axis=1)], axis=1)
    coef = np.linalg.lstsq(design, log_mu, rcond=None)[0]
    if np.max(np.abs(design @ coef - log_mu)) > 1e-10 * max(1.0, float(np.max(np.abs(log_mu)))):
        raise ConfigError("actions.reference: flow.kind = 'gaussian_wpo' needs a Lebesgue or Gaussian reference")
    return float(coef[0]), float(coef[1])


class GaussianWPO(Flow):
    """Parametric Gaussian WPO (module docstring). ``model`` (the :class:`solver.models.Model`) is required: ``Q``
    is evaluated at Gauss-Hermite nodes off the action mesh."""

    kind = "gaussian_wpo"
    mpi = False
    adaptive = False
    actions_2d = True

    def __init__(self, mdp, config, partition, model=None):
        super().__init__(mdp, config, partition, model)
        if model is None:
            raise ConfigError("flow.kind: 'gaussian_wpo' evaluates Q off the action mesh and needs the model "
                              "(solver.runner.make_flow passes it; directly: GaussianWPO(mdp, config, partition, "
                              "model=...))")
        self.dim = mdp.space.dim
        self.diagonal = config.covariance == "diagonal"
        self.tau_flow = mdp.tau if config.entropy else 0.0
        self._z, self._w = hermite_rule(self.dim, HERMITE_NODES[self.dim])
        _, self._c2 = reference_quadratic(mdp.log_mu, mdp.space.coords)
        self._cache: tuple[FlowState, tuple] | None = None  # (a flow state, its (G, H)): dissipation, summary
        self.max_truncated, self.truncated_last, self.fallback_steps = 0.0, 0.0, 0
        self.collapsed_at: float | None = None
        coords = mdp.space.coords
        self._collapse = COLLAPSED_VARIANCE * float(np.sum((coords.max(axis=0) - coords.min(axis=0)) ** 2))

    # --- the Gaussian <-> the DOFs ----------------------------------------------------------------------

    def density(self, m: np.ndarray, S: np.ndarray, track: bool = False) -> np.ndarray:
        """``(N, M)``: ``N(m, S)`` at the DOFs renormalised on the domain (``sum_j w_j p_j = 1``).

        ``track``: update ``max_truncated`` (the Gaussian mass outside the domain, by the lumped quadrature) with
        this policy's (the policies of the flow, not those of the ETDRK4 stages).
        """
        coords, weights = self.mdp.space.coords, self.mdp.weights
        L = np.linalg.cholesky(S)
        Linv = small_inverse(L)
        y = np.einsum("nij,nmj->nmi", Linv, coords[None, :, :] - m[:, None, :])
        log_phi = -0.5 * np.sum(y * y, axis=2)
        shift = log_phi.max(axis=1, keepdims=True)
        mass = np.exp(log_phi - shift) @ weights
        # mass of the untruncated N(m, S) inside the domain (lumped quadrature): what the renormalisation removes
        log_det = 2 * np.sum(np.log(np.diagonal(L, axis1=1, axis2=2)), axis=1)
        inside = np.exp(np.log(mass) + shift[:, 0] - 0.5 * log_det - 0.5 * self.dim * math.log(2 * math.pi))
        if track:
            self.truncated_last = float(np.max(np.abs(1.0 - inside)))
            self.max_truncated = max(self.max_truncated, self.truncated_last)
        return np.exp(log_phi - shift - np.log(mass)[:, None])

    def start(self, p0: np.ndarray) -> np.ndarray:
        """Project ``p0`` on Gaussians by moments (diagonal family: its diagonal); return the Gaussian's DOF density."""
        masses = p0 * self.mdp.weights
        coords = self.mdp.space.coords
        m = masses @ coords
        centred = coords[None, :, :] - m[:, None, :]
        S = np.einsum("nj,nji,njk->nik", masses, centred, centred)
        if self.diagonal:
            S = S * np.eye(self.dim)
        self.m, self.S = m, S
        self.max_truncated, self.truncated_last, self.fallback_steps = 0.0, 0.0, 0
        self.collapsed_at = None
        return self.density(m, S, track=True)

    def checkpoint(self) -> dict[str, np.ndarray]:
        """``(m, Sigma)`` and the counters of the summary: with them the resumed run repeats the uninterrupted one
        bit for bit (the DOF density alone would lose ``(m, Sigma)`` to the renormalisation)."""
        collapsed = math.nan if self.collapsed_at is None else self.collapsed_at
        return {"mean": self.m, "covariance": self.S,
                "counters": np.array([self.max_truncated, self.truncated_last, self.fallback_steps, collapsed])}

    def restore(self, p: np.ndarray, data: dict[str, np.ndarray]) -> None:
        self.m, self.S = np.array(data["mean"], dtype=float), np.array(data["covariance"], dtype=float)
        counters = data["counters"]
        self.max_truncated, self.truncated_last = float(counters[0]), float(counters[1])
        self.fallback_steps = int(counters[2])
        self.collapsed_at = None if math.isnan(counters[3]) else float(counters[3])
        self._cache = None

    # --- expectations -----------------------------------------------------------------------------------

    def q_at(self, V: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """``Q(s_i, a) = r(s_i, a) + gamma sum_k T(s_k | f(s_i, a)) V_k`` at actions ``(N, K, d)``: ``(N, K)``."""
        mdp, model = self.mdp, self.model
        n, k = actions.shape[:2]
        s = mdp.states[:, None]
        a = actions if self.dim == 2 else actions[..., 0]
        reward = np.broadcast_to(np.asarray(model.reward(s, a), dtype=float), (n, k))
        if model.single_state:
            return reward + mdp.gamma * V[0]
        mean = np.asarray(model.dynamics(s, a), dtype=float)
        if mdp.states.ndim == 2:
            kernel = GaussianGridKernel2D(grid_axes(mdp.states), np.broadcast_to(mean, (n, k, 2)).copy(), model.sigma)
            return reward + mdp.gamma * kernel.expect(V)
        mean = np.broadcast_to(mean, (n, k))  # 1D grid: the windows of GaussianGridKernel, contracted directly
        start, width = window_starts(mdp.states, mean, model.sigma)
        values = window_values(mdp.states, mean, start, width, model.sigma)
        return reward + mdp.gamma * np.einsum("nkl,nkl->nk", values, V[start[..., None] + np.arange(width)])

    def moments(self, V: np.ndarray, m: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(G, H) = (E[grad g], E[Hess g])`` under ``N(m, S)`` per state, ``g = Q - tau U`` (or ``Q``), Stein +
        Gauss-Hermite (the full ``H``; :meth:`family` reduces it for the diagonal family)."""
        L = np.linalg.cholesky(S)
        nodes = m[:, None, :] + np.einsum("nij,kj->nki", L, self._z)
        values = self.q_at(V, nodes)
        if self.config.entropy:
            values = values + self.tau_flow * self._c2 * np.sum(nodes ** 2, axis=2)  # -tau U = tau log mu + const
        return stein_moments(values, self._z, self._w, small_inverse(L))

    def family(self, H: np.ndarray) -> np.ndarray:
        """The ``H`` of the covariance equation: ``diag(H)`` for the diagonal family (the projection of the
        Bures-Wasserstein gradient on diagonal covariances), ``H`` otherwise."""
        return H * np.eye(self.dim) if self.diagonal else H

    def velocity(self, G: np.ndarray, H: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(dm/dt, dSigma/dt) = (G, H S + S H + 2 tau I)`` with ``H`` reduced by :meth:`family` (``tau = 0`` with
        ``flow.entropy = false``)."""
        H = self.family(H)
        return G, H @ S + S @ H + 2 * self.tau_flow * np.eye(self.dim)

    def _state_moments(self, state: FlowState) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] is not state:
            self._cache = (state, self.moments(state.evaluation.V, self.m, self.S))
        return self._cache[1]

    # --- the protocol -----------------------------------------------------------------------------------

    def _stage(self, m: np.ndarray, S: np.ndarray, t: float, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The velocity ``(dm/dt, dSigma/dt)`` at the Gaussian policy ``(m, S)``: its ``Q`` is evaluated afresh."""
        ev = evaluate_checked(self.mdp, self.density(m, S), step, t, self.partition)
        ev.resolvent.release()
        return self.velocity(*self.moments(ev.V, m, S), S)

    def advance(self, state: FlowState, t_end: float) -> tuple[np.ndarray, float, int]:
        t_new = self.fixed_time(state, t_end)
        h = t_new - state.t
        m, S = self.m, self.S
        G, H_full = self._state_moments(state)
        H = self.family(H_full)  # the frozen linear part (diagonal family: keeps Sigma diagonal exactly)
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                m_new, S_new = etdrk4_step(m, S, H, self.velocity(G, H_full, S),
                                           lambda mu, Su, dt: self._stage(mu, Su, state.t + dt, state.step), h)
            np.linalg.cholesky(S_new)  # SPD (raises LinAlgError otherwise; NaN fails too)
            if not (np.all(np.isfinite(m_new)) and np.all(np.isfinite(S_new))):
                raise np.linalg.LinAlgError("non-finite step")
        except np.linalg.LinAlgError:  # left the SPD cone: this step is exponential Euler, SPD for every h
            m_new, S_new = exponential_step(m, S, G, H, h, self.tau_flow)
            self.fallback_steps += 1
            try:  # SPD in exact arithmetic; only an underflow of Sigma (no entropy, huge h |H|) can break it
                np.linalg.cholesky(S_new)
            except np.linalg.LinAlgError:
                raise NumericalError(f"gaussian_wpo: the covariance underflowed to 0 in the step from t = "
                                     f"{state.t:.6g} (dt = {h:.3g}): take a smaller flow.dt") from None
        self.m, self.S = m_new, S_new
        self._cache = None
        return self.density(m_new, S_new, track=True), t_new, 0

    def more(self, state: FlowState, t_end: float) -> bool:
        """Also stop once the Gaussian has collapsed (``flow.entropy = false``; module docstring, "Collapse")."""
        if self.collapsed_at is None and float(np.linalg.eigvalsh(self.S).min()) < self._collapse:
            self.collapsed_at = state.t
        return self.collapsed_at is None and super().more(state, t_end)

    def dissipation(self, state: FlowState) -> np.ndarray:
        mdot, Sdot = self.velocity(*self._state_moments(state), self.S)
        rate = density_rate(self.mdp.space.coords, self.mdp.weights, state.p, self.m, self.S, mdot, Sdot)
        positive = state.p > 0
        log_p = np.log(np.where(positive, state.p, 1.0))
        integrand = np.where(positive, rate * (state.evaluation.Q - self.mdp.tau * (log_p - self.mdp.log_mu)), 0.0)
        return integrand @ self.mdp.weights

    def predicted_rate(self, ell_min: float) -> float | None:
        """``2 min_s min eig(-H_s)`` at the flow's last state (its limit once converged), not ``2 ell_min``.

        Near its limit the states decouple (theory.md §5.3(e)) and a mean perturbation relaxes at ``-lam(H)``, a
        covariance one at ``-2 lam(H)`` (diagonal family: ``-2 H_ii >= -2 min lam``), so the gap decays at
        ``2 min(-lam)``, ``H`` the full expected Hessian: for LQR ``4 alpha``, the
        continuous-time WPG rate, since the expectations are exact Gaussian ones (not the P1 generator's, whose gap
        ``ell_min`` carries the mesh error) and the step is exact in time for the linearised flow. None without
        entropy (the variance collapses: no linear rate) or if ``H`` is not negative definite.
        """
        if self._cache is None or not self.config.entropy:
            return None
        top = float(np.linalg.eigvalsh(self._cache[1][1]).max())
        return -2 * top if top < 0 else None

    def summary(self, problem, result) -> dict:
        """The projection gap ``J* - J*_Gauss`` (``J*_Gauss``: the flow's own limit, its last ``J`` once stationary,
        i.e. ``dJ/dt <= STATIONARY_TOLERANCE max(1, |J|)``), the final speeds and the truncation at the action boundary,
        with verdicts.

        Where the projection is not exact the gap does not tend to 0: ``predicted_rate`` is then set to None.
        """
        final = result.final
        J_final = float(result.rows[-1]["J"]) if result.rows else math.nan
        dJdt = float(result.rows[-1]["dissipation"]) if result.rows else math.nan
        residual = math.nan
        if final is not None:
            mdot, Sdot = self.velocity(*self._state_moments(final), self.S)
            residual = float(np.max(np.linalg.norm(mdot, axis=1) + np.linalg.norm(Sdot, axis=(1, 2))))
        stationary = bool(abs(dJdt) <= STATIONARY_TOLERANCE * max(1.0, abs(J_final)))
        gap = problem.J_star - J_final
        exact = bool(stationary and abs(gap) <= EXACT_PROJECTION * max(1.0, abs(problem.J_star)))
        out = {"gaussian_wpo": {
            "entropy": bool(self.config.entropy),
            "covariance": self.config.covariance,
            "J_star_gauss": J_final if stationary else None,
            "projection_gap": gap if stationary else None,
            "projection_gap_upper_bound": gap,
            "dJdt_final": dJdt,
            "velocity_max_final": residual,
            "stationary": stationary,
            "projection_exact": exact,
            "max_truncated_mass": self.max_truncated,
            "truncated_mass_final": self.truncated_last,
            "fallback_steps": self.fallback_steps,
            "collapsed_at": self.collapsed_at,
            "verdict": (f"the Gaussian collapsed (Sigma below {COLLAPSED_VARIANCE:g} diameter^2) at t = "
                        f"{self.collapsed_at:.6g}: flow.entropy = false drives the variance to 0"
                        if self.collapsed_at is not None else
                        "not stationary at the end: J* - J_final only bounds the projection gap from above"
                        if not stationary else "Gaussian optimum reached; the projection is exact" if exact
                        else "Gaussian optimum reached; J*_Gauss < J* (the gap tends to the projection gap)")
            + ("; the final Gaussian has visible mass outside the action domain (the dynamics are those of the "
               "untruncated Gaussian)" if self.truncated_last > VISIBLE_TRUNCATION
               else "; visible mass outside the action domain during the transient only"
               if self.max_truncated > VISIBLE_TRUNCATION else ""),
        }}
        if not exact:
            out["predicted_rate"] = None
        return out


def density_rate(coords: np.ndarray, weights: np.ndarray, p: np.ndarray, m: np.ndarray, S: np.ndarray,
                 mdot: np.ndarray, Sdot: np.ndarray) -> np.ndarray:
    """``d_t p`` ``(N, M)`` of the renormalised DOF density of ``N(m, S)`` moving at ``(mdot, Sdot)``.

    ``d_t log phi = (a - m)^T S^{-1} mdot + (a - m)^T S^{-1} Sdot S^{-1} (a - m) / 2 + const``, and
    ``d_t p_j = p_j (d_t log phi_j - sum_k w_k p_k d_t log phi_k)`` (the constants cancel).
    """
    Sinv = small_inverse(S)
    d = coords[None, :, :] - m[:, None, :]
    x = np.einsum("nij,nmj->nmi", Sinv, d)  # S^{-1} (a - m)
    dlog = np.einsum("nmi,ni->nm", x, mdot)
    dlog = dlog + 0.5 * np.einsum("nmi,nij,nmj->nm", x, Sdot, x)
    dlog = dlog - (p * dlog) @ weights[:, None]
    return p * dlog


def distance_to_flow(gaussian: GaussianWPO, other: Flow, p0: np.ndarray, t_end: float) -> dict:
    """How far the parametric dynamics are from a nonparametric flow (e.g. the exact WPG flow) on the same MDP.

    Both flows start from the Gaussian projection of ``p0`` (so the distance at ``t = 0`` is 0) and are stepped in
    lockstep (the same fixed ``dt``) to ``t_end``; at every common time the statewise
    ``KL(p_Gauss || p_other) = sum_j w_j p_G log(p_G / p_other)`` is taken (where ``p_other`` underflowed to 0 it
    counts as the smallest normal double, ~2e-308, so those tail terms are bounded by their mass times ~700).

    Returns:
        ``{"max_kl": max over time and states, "t_max_kl": its time, "final_kl": max over states at the end}``.
    """
    from .base import trajectory

    mdp = gaussian.mdp
    start = gaussian.start(p0)
    worst, t_worst, last = 0.0, 0.0, 0.0
    for g, o in zip(trajectory(gaussian, p0, t_end), trajectory(other, start, t_end)):
        if abs(g.t - o.t) > 1e-12 * max(1.0, g.t):
            raise ValueError(f"the flows are not in lockstep (t = {g.t} and {o.t}): give them the same dt")
        positive = g.p > 0
        # where p_other underflowed to 0 (far tails) it is taken as the smallest normal double: an upper bound
        ratio = np.log(np.where(positive, g.p, 1.0)) - np.log(np.maximum(o.p, np.finfo(float).tiny))
        last = float(np.max(np.where(positive, g.p * ratio, 0.0) @ mdp.weights))
        if last > worst:
            worst, t_worst = last, g.t
        g.release()
        o.release()
    return {"max_kl": worst, "t_max_kl": t_worst, "final_kl": last}
