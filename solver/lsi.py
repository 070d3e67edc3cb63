"""Log-Sobolev and Poincaré constants of densities on the action mesh, and the along-flow rate check.

Conventions (math.md §5.1): LSI(C) is ``Ent_nu(f^2) <= (2/C) int |grad f|^2 dnu``; Poincaré(lambda) is
``Var_nu(f) <= (1/lambda) int |grad f|^2 dnu``; ``C <= lambda``; ``N(m, sigma^2)`` has ``C = lambda = 1/sigma^2``.

**Which density.** A density is given by its log at the DOFs (``log_density (M,)``, unnormalised, w.r.t.
Lebesgue). Between DOFs it is the *log-linear* interpolant ``nu_h = exp(I_h log nu)`` (the density the
exponentially fitted flow scheme sees), normalised to ``int nu_h = 1``. Log-densities more than
:data:`LOG_FLOOR` below their maximum are raised to it (relative mass ``< e^-600``; keeps every integral a
normal double). All constants below are those of ``nu_h`` on the meshed domain:

* :func:`poincare`: the Galerkin spectral gap of P1 functions, ``K f = lambda M f`` with
  ``K_jk = int nu_h grad phi_j . grad phi_k`` and the consistent mass ``M_jk = int nu_h phi_j phi_k`` (both by a
  per-cell quadrature of ``nu_h``; P1 gradients are constant per simplex). By min-max it is an upper bound of
  the continuum gap of ``nu_h`` (up to quadrature error) and converges at ``O(h^2)``. (Lumped masses would
  undershoot: on a uniform interval ``4 sin^2(pi h / 2L) / h^2 < pi^2 / L^2``.)
* :func:`lsi_upper`: ``min 2 int |grad f|^2 dnu_h / Ent(f^2)`` over positive P1 functions ``f = exp(u/2)``
  (L-BFGS on ``u`` with the analytic gradient, several starts), and ``lambda`` itself (the limit
  ``f = 1 + eps phi``, ``eps -> 0``, of the ratio). Every value is a test function's ratio, hence an upper bound.
* :func:`lsi_lower`: closed-form lower bounds, valid for ``nu_h`` itself:

  - "Bakry-Emery + Holley-Stroock": fit ``W_q(a) = 1/2 a^T H a + b^T a + c`` to ``W = -log nu`` by least
    squares at the DOFs; if ``H`` is positive definite and the domain convex, the truncated Gaussian
    ``e^{-W_q}`` has LSI(``lambda_min(H)``) (Bakry-Emery, math.md §7.4) and ``psi = W_h - W_q`` perturbs it by
    ``exp(-osc psi)`` (Holley-Stroock). On a cell ``psi`` is linear minus convex, so its minimum is at a vertex
    and its maximum exceeds the vertex values by at most ``lambda_max(H) R_c^2 / 2`` (``R_c`` the
    circumradius: ``sum_i b_i |x_i - x|^2 <= R_c^2`` for barycentric ``b``).
  - "Holley-Stroock (uniform)": on an interval or an axis-aligned rectangle the uniform measure has
    ``C = pi^2 / max side^2`` (math.md §7.4) and ``W_h`` is piecewise linear, so ``C >= C_unif exp(-osc W)``.
  - On a non-convex domain neither applies: lower bound 0, method "none (domain not convex)".

**Along the flow** (math.md §5.3(c)): :class:`LocalRates` takes at each snapshot of a run the local rate
``r = (dJ/dt) / (J* - J)`` with ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D^h``, the mismatch
``kappa = max_s d*_rho(s) / d^pi_rho(s)``, ``C_lo = min_s`` (lower bound of the Gibbs policy ``G^pi_s``) and the
check ``r >= theta 2 tau C_lo / kappa``. ``r`` belongs to the semi-discrete flow, whose constants are the
discrete ones (math.md §8.5), ``O(h^2)`` away from the continuum ``C_lo``; ``theta = min(1, ell / (tau lambda))``
at the slowest state of ``Q*`` (:func:`discrete_factor`) measures that factor (``1 - 7e-4`` for the shipped
``bandit_ou``, where the continuum bound is sharp and the uncorrected check fails by ``2e-4``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.linalg as sla
import scipy.optimize as opt
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.spatial import ConvexHull

from . import bellman, diagnostics, flows
from .fem import ActionSpace

#: Log-densities below ``max - 600`` are raised to it (``e^-600 ~ 1e-261``: all integrals stay normal doubles).
LOG_FLOOR = 600.0

#: Up to this many DOFs the generalised eigenproblem is solved densely (LAPACK), above by ARPACK shift-invert.
DENSE_DOFS = 1200

#: Quadrature rules on the reference simplex: barycentric points (q, d + 1) and weights summing to 1.
#: 1D: 3-point Gauss (degree 5). 2D: 6-point Strang-Fix/Dunavant rule (degree 4).
_G1 = math.sqrt(15.0) / 10.0
_A2, _B2 = 0.445948490915965, 0.091576213509771
_WA2, _WB2 = 0.223381589678011, 0.109951743655322
QUADRATURE = {
    1: (np.array([[0.5 + _G1, 0.5 - _G1], [0.5, 0.5], [0.5 - _G1, 0.5 + _G1]]), np.array([5.0, 8.0, 5.0]) / 18.0),
    2: (np.array([[_A2, _A2, 1 - 2 * _A2], [_A2, 1 - 2 * _A2, _A2], [1 - 2 * _A2, _A2, _A2],
                  [_B2, _B2, 1 - 2 * _B2], [_B2, 1 - 2 * _B2, _B2], [1 - 2 * _B2, _B2, _B2]]),
        np.array([_WA2] * 3 + [_WB2] * 3)),
}

#: Relative tolerance for "the mesh fills its convex hull / its bounding box".
_SHAPE_RTOL = 1e-9


# ----------------------------------------------------------------------------------------------------------
# geometry of the mesh (density independent)


@dataclass(frozen=True)
class Geometry:
    """Per-cell P1 data of an action mesh.

    Attributes:
        grads: ``(C, d + 1, d)`` gradients of the cell's barycentric (P1 basis) functions.
        volumes: ``(C,)`` cell volumes.
        circumradius2: ``(C,)`` squared circumradii (``h^2 / 4`` in 1D).
        lam: ``(q, d + 1)`` barycentric quadrature points; ``omega``: ``(q,)`` weights summing to 1.
        convex: True if the mesh fills its convex hull (intervals always).
        box_side: the longest side if the mesh is an interval or an axis-aligned rectangle, else None.
    """

    grads: np.ndarray
    volumes: np.ndarray
    circumradius2: np.ndarray
    lam: np.ndarray
    omega: np.ndarray
    convex: bool
    box_side: float | None


def geometry(space: ActionSpace) -> Geometry:
    """Cell gradients, volumes, circumradii and the shape tests of ``space`` (vectorised over cells)."""
    d = space.dim
    X = space.coords[space.cells]  # (C, d + 1, d)
    E = X[:, 1:] - X[:, :1]  # (C, d, d): rows x_i - x_0
    inv_t = np.linalg.inv(E).transpose(0, 2, 1)  # rows: gradients of the barycentric coordinates 1..d
    grads = np.concatenate([-inv_t.sum(axis=1, keepdims=True), inv_t], axis=1)
    volumes = np.abs(np.linalg.det(E)) / math.factorial(d)
    if d == 1:
        r2 = volumes ** 2 / 4
    else:
        a2 = np.sum((X[:, 1] - X[:, 0]) ** 2, axis=1)
        b2 = np.sum((X[:, 2] - X[:, 1]) ** 2, axis=1)
        c2 = np.sum((X[:, 0] - X[:, 2]) ** 2, axis=1)
        r2 = a2 * b2 * c2 / (16 * volumes ** 2)  # R = abc / (4 area)
    total = volumes.sum()
    lo, hi = space.coords.min(axis=0), space.coords.max(axis=0)
    box = float(np.prod(hi - lo))
    if d == 1:
        convex = bool(abs(total - box) <= _SHAPE_RTOL * box)  # no holes between the cells
    else:
        convex = bool(abs(ConvexHull(space.coords).volume - total) <= 1e-7 * total)
    box_side = float(np.max(hi - lo)) if abs(total - box) <= _SHAPE_RTOL * box else None
    lam, omega = QUADRATURE[d]
    return Geometry(grads=grads, volumes=volumes, circumradius2=r2, lam=lam, omega=omega, convex=convex,
                    box_side=box_side)


_GEOMETRIES: dict[int, tuple[ActionSpace, Geometry]] = {}


def _geometry(space: ActionSpace) -> Geometry:
    """:func:`geometry`, cached per action space object."""
    entry = _GEOMETRIES.get(id(space))
    if entry is None or entry[0] is not space:
        entry = (space, geometry(space))
        _GEOMETRIES[id(space)] = entry
    return entry[1]


# ----------------------------------------------------------------------------------------------------------
# the density's forms


@dataclass(frozen=True)
class Forms:
    """The weighted P1 forms of one normalised density ``nu_h``.

    Attributes:
        log_nu: ``(M,)`` floored, normalised log-density at the DOFs.
        K: ``(M, M)`` sparse stiffness ``int nu_h grad phi_j . grad phi_k``.
        mass: ``(M, M)`` sparse consistent mass ``int nu_h phi_j phi_k``.
        cell_nu: ``(C,)`` ``int_cell nu_h`` (cell mass).
        quad_mass: ``(C, q)`` quadrature masses ``m_cq = |c| omega_q nu_h(x_cq)`` (sum 1).
    """

    log_nu: np.ndarray
    K: sp.csr_matrix
    mass: sp.csr_matrix
    cell_nu: np.ndarray
    quad_mass: np.ndarray


def forms(space: ActionSpace, log_density: np.ndarray) -> Forms:
    """Assemble :class:`Forms` for ``log_density`` ``(M,)`` (vectorised over cells; no DOLFINx)."""
    geo = _geometry(space)
    log_nu = np.asarray(log_density, float)
    if log_nu.shape != (space.n_dofs,) or not np.all(np.isfinite(log_nu)):
        raise ValueError(f"log_density must be finite with shape ({space.n_dofs},)")
    log_nu = np.maximum(log_nu - log_nu.max(), -LOG_FLOOR)
    cells = space.cells
    quad = geo.volumes[:, None] * geo.omega[None, :] * np.exp(log_nu[cells] @ geo.lam.T)  # (C, q)
    total = quad.sum()
    quad /= total
    log_nu = log_nu - math.log(total)
    cell_nu = quad.sum(axis=1)
    M = space.n_dofs
    rows = np.repeat(cells, cells.shape[1], axis=1).ravel()
    cols = np.tile(cells, (1, cells.shape[1])).ravel()
    k_local = cell_nu[:, None, None] * np.einsum("cid,ckd->cik", geo.grads, geo.grads)
    m_local = np.einsum("cq,qi,qk->cik", quad, geo.lam, geo.lam)
    K = sp.csr_matrix((k_local.ravel(), (rows, cols)), shape=(M, M))
    mass = sp.csr_matrix((m_local.ravel(), (rows, cols)), shape=(M, M))
    return Forms(log_nu=log_nu, K=K, mass=mass, cell_nu=cell_nu, quad_mass=quad)


def dirichlet(space: ActionSpace, fm: Forms, f: np.ndarray) -> float:
    """``int |grad f|^2 dnu_h`` of the P1 function ``f`` (a sum of non-negative cell terms)."""
    g = np.einsum("cid,ci->cd", _geometry(space).grads, f[space.cells])
    return float(fm.cell_nu @ np.sum(g * g, axis=1))


# ----------------------------------------------------------------------------------------------------------
# Poincaré constant


@dataclass(frozen=True)
class Poincare:
    """Spectral gap ``value`` of ``nu_h`` and its eigenfunction ``f (M,)`` (``int f dnu = 0``, ``int f^2 dnu = 1``)."""

    value: float
    f: np.ndarray


def poincare(space: ActionSpace, log_density: np.ndarray, fm: Forms | None = None) -> Poincare:
    """Smallest non-zero eigenvalue of ``K f = lambda M f`` (Neumann, math.md §5.1: ``N(m, s^2)`` has ``1/s^2``).

    Scaled by ``D = diag(M)^{-1/2}`` (so tiny densities do not spoil the conditioning); dense LAPACK up to
    :data:`DENSE_DOFS` DOFs, else ARPACK shift-invert at ``-s`` with ``s`` the Rayleigh quotient of the
    coordinate functions (``>= lambda``). The value returned is the Rayleigh quotient of the computed
    eigenvector after projecting out the constants: an exact upper bound of the discrete gap, free of the
    cancellation in ``sigma + 1/theta``.
    """
    fm = forms(space, log_density) if fm is None else fm
    D = 1.0 / np.sqrt(fm.mass.diagonal())
    Ks = sp.csr_matrix(sp.diags(D) @ fm.K @ sp.diags(D))
    Ms = sp.csr_matrix(sp.diags(D) @ fm.mass @ sp.diags(D))
    if space.n_dofs <= DENSE_DOFS:
        _, vec = sla.eigh(Ks.toarray(), Ms.toarray(), subset_by_index=(1, 1), check_finite=False)
        f = D * vec[:, 0]
    else:
        shift = min(_rayleigh(space, fm, space.coords[:, i]) for i in range(space.dim))
        _, vecs = spla.eigsh(Ks.tocsc(), k=2, M=Ms.tocsc(), sigma=-shift, which="LM")
        f = D * vecs[:, 1]  # ARPACK returns ascending: the constant (0) first
    f = f - fm.mass @ f @ np.ones(space.n_dofs)  # int f dnu = 1^T M f (int 1 dnu = 1)
    f = f / math.sqrt(f @ (fm.mass @ f))
    return Poincare(value=dirichlet(space, fm, f), f=f)


def _rayleigh(space: ActionSpace, fm: Forms, f: np.ndarray) -> float:
    """``int |grad f|^2 dnu / Var_nu(f)`` (an upper bound of the spectral gap)."""
    f = f - np.ones(space.n_dofs) @ (fm.mass @ f)
    return dirichlet(space, fm, f) / float(f @ (fm.mass @ f))


# ----------------------------------------------------------------------------------------------------------
# LSI: upper bound by minimising the ratio


@dataclass(frozen=True)
class RatioMinimum:
    """Result of :func:`lsi_upper`.

    Attributes:
        value: the smallest ratio found, ``min(lambda, ratio minima)`` (an upper bound on ``C``).
        start: label of the start that gave it ("poincare limit" if ``lambda`` itself is smallest).
        f: ``(M,)`` the minimiser, ``int f^2 dnu = 1`` (the Poincaré eigenfunction for "poincare limit").
        by_start: ``{label: ratio}`` for every start.
        poincare: the spectral gap ``lambda``.
    """

    value: float
    start: str
    f: np.ndarray
    by_start: dict
    poincare: float


def lsi_ratio(space: ActionSpace, fm: Forms, u: np.ndarray) -> tuple[float, np.ndarray]:
    """``R(u) = 2 int |grad f|^2 dnu / Ent_nu(f^2)`` for ``f = exp(u / 2)`` and its gradient ``dR/du``.

    ``Ent_nu(f^2) = sum_q m_q f_q^2 log f_q^2 - S log S`` with ``S = sum_q m_q f_q^2`` over the quadrature points
    (``f_q`` the P1 interpolant). ``R`` is invariant under ``u -> u + c``; ``u`` is shifted to ``max u = 0``.
    Returns ``(inf, 0)`` where the entropy is not positive (``f`` constant to round-off).
    """
    geo = _geometry(space)
    f = np.exp(0.5 * (u - u.max()))
    fc = f[space.cells]  # (C, d + 1)
    fq = fc @ geo.lam.T  # (C, q)
    f2 = fq * fq
    log_f2 = np.log(np.maximum(f2, np.finfo(float).tiny))
    S = float(np.sum(fm.quad_mass * f2))
    E = float(np.sum(fm.quad_mass * f2 * log_f2)) - S * math.log(S)
    grad_cells = np.einsum("cid,ci->cd", geo.grads, fc)  # (C, d)
    N = 2.0 * float(fm.cell_nu @ np.sum(grad_cells * grad_cells, axis=1))
    if not E > 1e-14 * S:
        return math.inf, np.zeros_like(u)
    R = N / E
    # dN/df = 4 K f (assembled per cell); dE/df_j = sum_q lam_qj 2 m_q f_q (log f_q^2 - log S)
    dN = 4.0 * np.einsum("c,cid,cd->ci", fm.cell_nu, geo.grads, grad_cells)
    dE = np.einsum("cq,qi->ci", 2.0 * fm.quad_mass * fq * (log_f2 - math.log(S)), geo.lam)
    dR_df = np.bincount(space.cells.ravel(), weights=((dN - R * dE) / E).ravel(), minlength=space.n_dofs)
    return R, dR_df * 0.5 * f


def _starts(space: ActionSpace, fm: Forms, phi: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Starting points ``u`` (``f = exp(u/2)``): ``1 + eps phi``, exponentials ``e^{beta . a}``, random smooth."""
    a = space.coords
    mean = (fm.mass @ np.ones(space.n_dofs)) @ a
    centred = a - mean
    cov = np.einsum("j,jk,jl->kl", fm.mass @ np.ones(space.n_dofs), centred, centred)
    sigma = math.sqrt(max(float(np.linalg.eigvalsh(cov).max()), 1e-300))
    starts = {"1+eps*phi": 2.0 * np.log1p(0.2 * phi / np.max(np.abs(phi)))}
    directions = np.linalg.eigh(cov)[1].T if space.dim > 1 else np.ones((1, 1))  # principal axes
    for direction in directions:
        for scale in (0.5, 2.0):
            for sign in (1, -1):
                beta = sign * scale / sigma * direction
                starts[f"exp(beta.a), beta={np.round(beta, 4).tolist()}"] = centred @ beta
    rng = np.random.default_rng(seed)
    lo, hi = a.min(axis=0), a.max(axis=0)
    for n in range(2):
        u = np.zeros(space.n_dofs)
        for i in range(space.dim):
            x = (a[:, i] - lo[i]) / max(hi[i] - lo[i], 1e-300)
            u += sum(rng.normal() * np.cos(math.pi * k * x) for k in range(1, 4))
        starts[f"random smooth #{n}"] = u
    return starts


def lsi_upper(space: ActionSpace, log_density: np.ndarray, fm: Forms | None = None,
              pc: Poincare | None = None, seed: int = 0, maxiter: int = 200) -> RatioMinimum:
    """Upper bound on the LSI constant: ``min(lambda, min over starts of the L-BFGS minimum of the ratio)``."""
    fm = forms(space, log_density) if fm is None else fm
    pc = poincare(space, log_density, fm) if pc is None else pc
    best = ("poincare limit", pc.value, pc.f)
    by_start = {"poincare limit": pc.value}
    for label, u0 in _starts(space, fm, pc.f, seed).items():
        res = opt.minimize(lambda u: lsi_ratio(space, fm, u), u0, jac=True, method="L-BFGS-B",
                           options={"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-10})
        value, _ = lsi_ratio(space, fm, res.x)  # the ratio of the returned point itself
        by_start[label] = value
        if value < best[1]:
            best = (label, value, res.x)
    label, value, x = best
    if label == "poincare limit":
        f = x
    else:
        f = np.exp(0.5 * (x - x.max()))
        f = f / math.sqrt(f @ (fm.mass @ f))
    return RatioMinimum(value=value, start=label, f=f, by_start=by_start, poincare=pc.value)


# ----------------------------------------------------------------------------------------------------------
# LSI: lower bounds (vectorised over densities)

#: Method names of the lower bounds, indexed by :func:`lower_bounds`' ``method`` array.
LOWER_METHODS = ("none (domain not convex)", "Bakry-Emery + Holley-Stroock (quadratic fit)",
                 "Bakry-Emery + Holley-Stroock (kappa-convex split)", "Holley-Stroock (uniform)",
                 "none (no bound applies)")

#: The curvatures tried by the kappa-convex split: ``kappa_0 2^-k`` (module docstring).
KAPPA_STEPS = np.arange(-1, 10)

#: Slopes of the affine minorants whose maximum is the convex part in 1D.
ENVELOPE_SLOPES = 48


def _quadratic_design(a: np.ndarray) -> np.ndarray:
    """Columns ``1, a_i, a_i a_k (i <= k)`` at the DOFs, ``(M, 1 + d + d(d+1)/2)``."""
    d = a.shape[1]
    cols = [np.ones(a.shape[0])] + [a[:, i] for i in range(d)]
    cols += [a[:, i] * a[:, k] for i in range(d) for k in range(i, d)]
    return np.stack(cols, axis=1)


def _split_bound(space: ActionSpace, psi: np.ndarray, curvature: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    """``kappa exp(-osc psi_h)`` for ``W = V + psi`` with ``V`` kappa-convex and ``W_h - psi_h`` convex on cells.

    ``psi (N, M)`` at the DOFs; on each cell ``psi_h`` is concave with excess over its vertex values at most
    ``curvature R_c^2 / 2`` (``curvature (N,)`` the largest Hessian eigenvalue of the quadratic part of V).
    """
    geo = _geometry(space)
    cell_max = psi[:, space.cells].max(axis=2) + 0.5 * curvature[:, None] * geo.circumradius2[None, :]
    osc = cell_max.max(axis=1) - psi.min(axis=1)
    return np.where(kappa > 0, np.maximum(kappa, 0.0) * np.exp(-osc), 0.0)


def _convex_minorant_1d(a: np.ndarray, f: np.ndarray) -> np.ndarray:
    """A convex minorant of ``f (N, M)`` at the sorted nodes ``a (M,)``: the maximum of the affine minorants
    ``p a - f*(p)`` with :data:`ENVELOPE_SLOPES` slopes ``p`` between the extreme node slopes (``f*`` exact).
    Its nodal interpolant is convex and ``<= f`` at the nodes."""
    slopes = np.diff(f, axis=1) / np.diff(a)[None, :]
    p = np.linspace(slopes.min(axis=1), slopes.max(axis=1), ENVELOPE_SLOPES, axis=1)  # (N, P)
    conj = np.max(p[:, :, None] * a[None, None, :] - f[:, None, :], axis=2)  # f*(p), (N, P)
    return np.max(p[:, :, None] * a[None, None, :] - conj[:, :, None], axis=1)


def lower_bounds(space: ActionSpace, log_densities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form LSI lower bounds of ``nu_h`` for many densities at once (module docstring).

    Three families, the best one is returned per density:

    1. quadratic fit: ``V = W_q`` (least squares at the DOFs), ``kappa = lambda_min(H)``;
    2. kappa-convex split, for ``kappa = kappa_0 2^-k`` (:data:`KAPPA_STEPS`, ``kappa_0`` the fit's
       ``lambda_min(H)`` if positive, else ``8 / |box diagonal|^2``): ``V = kappa |a|^2 / 2 + phi`` with ``phi`` convex:
       in 1D the (piecewise-linear) convex minorant of ``W - kappa a^2 / 2`` (:func:`_convex_minorant_1d`), in
       2D its least-squares affine fit. Bakry-Emery gives LSI(kappa) for ``e^{-V}`` on the convex domain;
    3. Holley-Stroock against the uniform measure of an interval or rectangle.

    Args:
        space: the action space.
        log_densities: ``(N, M)`` log-densities at the DOFs (unnormalised).

    Returns:
        ``(value (N,), method (N,) int)``: the best bound and its index in :data:`LOWER_METHODS`.
    """
    geo = _geometry(space)
    logs = np.atleast_2d(np.asarray(log_densities, float))
    n = logs.shape[0]
    if not geo.convex:
        return np.zeros(n), np.zeros(n, int)
    W = -np.maximum(logs - logs.max(axis=1, keepdims=True), -LOG_FLOOR)  # (N, M), min 0
    d = space.dim
    a = space.coords
    lo, hi = a.min(axis=0), a.max(axis=0)
    x = a - 0.5 * (lo + hi)  # conditioning of the fits
    design = _quadratic_design(x)
    coef = np.linalg.lstsq(design, W.T, rcond=None)[0]  # (P, N)
    H = np.zeros((n, d, d))
    col = 1 + d
    for i in range(d):
        for k in range(i, d):
            H[:, i, k] = H[:, k, i] = coef[col] * (2 if i == k else 1)
            col += 1
    eig = np.linalg.eigvalsh(H)  # (N, d) ascending
    fitted = _split_bound(space, W - (design @ coef).T, np.maximum(eig[:, -1], 0.0), eig[:, 0])
    r2 = np.sum(x * x, axis=1)
    kappa0 = np.where(eig[:, 0] > 0, eig[:, 0], 8.0 / float(np.sum((hi - lo) ** 2)))  # 2 / R^2 for a disk at k = -1
    split = np.zeros(n)
    affine = design[:, :1 + d]
    for step in KAPPA_STEPS:
        kappa = kappa0 * 2.0 ** -float(step)
        f = W - 0.5 * kappa[:, None] * r2[None, :]
        if d == 1 and space.is_chain:
            phi = _convex_minorant_1d(a[:, 0], f)
        else:
            phi = (affine @ np.linalg.lstsq(affine, f.T, rcond=None)[0]).T
        split = np.maximum(split, _split_bound(space, f - phi, kappa, kappa))
    if geo.box_side is not None:
        hs = math.pi ** 2 / geo.box_side ** 2 * np.exp(-(W.max(axis=1) - W.min(axis=1)))
    else:
        hs = np.zeros(n)
    candidates = np.stack([fitted, split, hs])  # methods 1, 2, 3
    best = np.argmax(candidates, axis=0)
    value = candidates[best, np.arange(n)]
    return value, np.where(value > 0, best + 1, 4)


def lsi_lower(space: ActionSpace, log_density: np.ndarray) -> tuple[float, str]:
    """Best closed-form LSI lower bound of one density and its method name."""
    value, method = lower_bounds(space, np.asarray(log_density)[None, :])
    return float(value[0]), LOWER_METHODS[int(method[0])]


# ----------------------------------------------------------------------------------------------------------
# the bracket


@dataclass(frozen=True)
class LSIBracket:
    """``lower <= C_LSI <= upper <= poincare`` with the method at each end (convention math.md §5.1)."""

    lower: float
    lower_method: str
    upper: float
    upper_method: str
    poincare: float

    def as_dict(self) -> dict:
        return asdict(self)


def bracket(space: ActionSpace, log_density: np.ndarray, seed: int = 0) -> LSIBracket:
    """LSI bracket and Poincaré constant of the density ``exp(log_density)`` on ``space``."""
    fm = forms(space, log_density)
    pc = poincare(space, log_density, fm)
    upper = lsi_upper(space, log_density, fm, pc, seed)
    lower, lower_method = lsi_lower(space, log_density)
    upper_method = ("Poincare gap (limit f = 1 + eps phi)" if upper.start == "poincare limit"
                    else f"LSI ratio minimum (start {upper.start})")
    return LSIBracket(lower=lower, lower_method=lower_method, upper=upper.value, upper_method=upper_method,
                      poincare=pc.value)


# ----------------------------------------------------------------------------------------------------------
# along the flow (math.md §5.3(c))

#: Gaps below ``GAP_FLOOR * max(1, |J*|)`` are not tested (``holds`` NaN): there the round-off in ``J* - J``
#: (~1e-13 |J|, math.md §8.6, plus the mass drift of ~4e-16 per step, which moves J by ~tau drift / (1 - gamma))
#: is no longer small against the gap.
GAP_FLOOR = 1e-9

RATES_COLUMNS = ("t", "local_rate", "kappa", "C_lo", "bound", "holds", "bound_continuum")


@dataclass(frozen=True)
class AlongFlow:
    """The §5.3(c) check at every snapshot; arrays of shape ``(K,)`` (``holds`` 1/0, NaN if not tested).

    ``bound_continuum = 2 tau C_lo / kappa`` with the continuum lower bound ``C_lo``; ``bound`` is it times
    ``discrete_factor`` (see :func:`discrete_factor`), the bound for the semi-discrete flow that is checked.
    ``ell_star``: the generator gaps at ``Q*`` if they were computed for the factor (reused by the summary).
    """

    t: np.ndarray
    local_rate: np.ndarray
    kappa: np.ndarray
    C_lo: np.ndarray
    bound: np.ndarray
    holds: np.ndarray
    bound_continuum: np.ndarray
    discrete_factor: float
    ell_star: np.ndarray | None

    @property
    def all_hold(self) -> bool:
        tested = np.isfinite(self.holds)
        return bool(np.all(self.holds[tested] == 1))

    @property
    def all_hold_continuum(self) -> bool:
        tested = np.isfinite(self.holds)
        return bool(np.all(self.local_rate[tested] >= self.bound_continuum[tested]))

    def rows(self) -> list[dict]:
        return [{c: float(getattr(self, c)[k]) for c in RATES_COLUMNS} for k in range(self.t.size)]


def occupancy(mdp, evaluation: bellman.Evaluation) -> np.ndarray:
    """Discounted occupancy ``d^pi_rho = (1 - gamma) (I - gamma P^pi)^{-T} rho``, ``(N,)``."""
    return (1.0 - mdp.gamma) * evaluation.resolvent_adjoint(mdp.rho)


def discrete_factor(problem, ell: np.ndarray | None = None) -> tuple[float, int, float]:
    """``theta = min(1, ell_s / (tau lambda_s))`` at the slowest state ``s`` of ``Q*``: discrete over continuum gap.

    The local rate ``r(t)`` is that of the semi-discrete flow, whose functional constants are the discrete ones
    (math.md §8.5): they agree with the continuum constants of ``nu_h`` only up to ``O(h^2)``, and near the
    optimum ``r -> 2 ell_min`` (§5.3(e)). ``theta`` measures that ``O(h^2)`` factor where it matters (the slowest
    mode) and turns the continuum ``C_lo`` into the bound ``theta C_lo`` for the discrete flow.

    Returns:
        ``(theta, slowest state, lambda at that state)``.
    """
    mdp = problem.mdp
    if ell is None:
        ell = diagnostics.generator_gaps(mdp, problem.optimum.Q, problem.config.flow.scheme)
    slowest = int(np.argmin(ell))
    lam = poincare(mdp.space, log_gibbs_row(mdp, problem.optimum.Q, slowest)).value
    return min(1.0, float(ell[slowest]) / (mdp.tau * lam)), slowest, lam


def log_gibbs_row(mdp, Q: np.ndarray, state: int) -> np.ndarray:
    """``log G^Q_s`` at one state, ``(M,)``, without the ``(N, M)`` temporaries of the whole table."""
    return bellman.log_gibbs(mdp, Q[state:state + 1])[0][0]


def gibbs_lower_bounds(mdp, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lower_bounds` of the Gibbs policies ``G^Q_s`` of every state, computed in chunks of states so that
    the temporaries (several per cell and state) do not grow with ``N``."""
    both = flows.by_state_chunks(
        mdp.space, lambda q: np.column_stack(lower_bounds(mdp.space, bellman.log_gibbs(mdp, q)[0])), Q)
    return both[:, 0], both[:, 1].astype(int)


class LocalRates:
    """The local-rate check ``r(t) >= 2 tau C_lo / kappa_t`` (math.md §5.3(c)), one row per flow state given.

    Called with snapshot flow states while their evaluation is alive (``Snapshots(on_snapshot=...)``), it
    reuses the flow's own ``Q^pi`` and resolvent: no policy is evaluated again and no snapshot policy is kept.
    For each state: ``dJ/dt = x . D^h`` with ``x = (I - gamma P^pi)^{-T} rho`` (math.md §4),
    ``kappa = max_s d*(s) / d^pi(s)``, ``C_lo = min_s`` :func:`lower_bounds` of ``G^pi_s = exp(log_gibbs)``; the
    check is ``r >= theta 2 tau C_lo / kappa``.

    Args:
        problem: a built :class:`solver.experiment.Problem`.
        scheme: the flow scheme for ``D^h`` (default: the config's ``flow.scheme``).
        theta: the discrete factor (default: :func:`discrete_factor`).
    """

    def __init__(self, problem, scheme: str | None = None, theta: float | None = None):
        self.problem = problem
        self.scheme = problem.config.flow.scheme if scheme is None else scheme
        self.ell_star = None
        if theta is None:
            self.ell_star = diagnostics.generator_gaps(problem.mdp, problem.optimum.Q, self.scheme)
            theta = discrete_factor(problem, self.ell_star)[0]
        self.theta = theta
        self.d_star = occupancy(problem.mdp, bellman.evaluate(problem.mdp, problem.optimum.p))
        self.rows: list[tuple] = []

    def __call__(self, state: flows.FlowState) -> None:
        mdp, J_star, ev = self.problem.mdp, self.problem.J_star, state.evaluation
        if ev.resolvent.released:  # the last state of a failed run: the flow freed it when it tried a step
            ev = bellman.evaluate(mdp, state.p)
        x = ev.resolvent_adjoint(mdp.rho)
        rate_J = float(x @ flows.dissipation(mdp, state.p, state.g, self.scheme))
        gap = J_star - float(mdp.rho @ ev.V)
        kappa = float(np.max(self.d_star / ((1.0 - mdp.gamma) * x)))
        C_lo = float(gibbs_lower_bounds(mdp, ev.Q)[0].min())
        continuum = 2.0 * mdp.tau * C_lo / kappa
        tested = gap > GAP_FLOOR * max(1.0, abs(J_star))
        r = rate_J / gap if tested else math.nan
        bound = self.theta * continuum
        self.rows.append((state.t, r, kappa, C_lo, bound, float(r >= bound) if tested else math.nan, continuum))

    def result(self) -> AlongFlow:
        columns = np.array(self.rows, float).reshape(len(self.rows), len(RATES_COLUMNS)).T
        return AlongFlow(**dict(zip(RATES_COLUMNS, columns)), discrete_factor=self.theta, ell_star=self.ell_star)


def write_rates(path, along: AlongFlow) -> None:
    """Write ``rates.csv`` (columns :data:`RATES_COLUMNS`, one row per snapshot) into the run directory ``path``."""
    with open(Path(path) / "rates.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(RATES_COLUMNS)
        for row in along.rows():
            writer.writerow([repr(row[c]) for c in RATES_COLUMNS])


def read_rates(path) -> dict[str, np.ndarray] | None:
    """The columns of ``rates.csv`` in the run directory ``path`` (those its header names), or None if there is none."""
    file = Path(path) / "rates.csv"
    if not file.exists():
        return None
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))
    return {c: np.array([float(r[c]) for r in rows]) for c in (rows[0].keys() if rows else RATES_COLUMNS)}


def optimum_summary(problem, ell: np.ndarray) -> dict:
    """``summary.json`` keys at ``Q*``: ``predicted_rate_bound`` (§5.3(c) with ``kappa = 1``) and ``lsi_bracket``.

    ``lsi_bracket``: lower = ``min_s`` closed-form bound of ``G*_s``; upper, Poincaré from the slowest state
    (smallest generator gap ``ell_s``), which bounds the minimum over states from above; ``discrete_factor``
    (:func:`discrete_factor`). ``predicted_rate_bound = 2 tau C_lo`` (continuum ``C_lo``).
    """
    mdp = problem.mdp
    values, methods = gibbs_lower_bounds(mdp, problem.optimum.Q)
    slowest = int(np.argmin(ell))
    b = bracket(mdp.space, log_gibbs_row(mdp, problem.optimum.Q, slowest))
    low = int(np.argmin(values))
    theta = min(1.0, float(ell[slowest]) / (mdp.tau * b.poincare))
    entry = b.as_dict() | {"lower": float(values[low]), "lower_method": LOWER_METHODS[int(methods[low])],
                           "lower_state": low, "upper_state": slowest, "discrete_factor": theta}
    return {"predicted_rate_bound": 2.0 * mdp.tau * float(values[low]), "lsi_bracket": entry}


def state_report(problem, Q: np.ndarray, state: int | None = None) -> dict:
    """Bracket, Poincaré and generator gap ``ell`` of ``G^Q_s`` at ``state`` (default: the slowest state)."""
    mdp = problem.mdp
    ell = diagnostics.generator_gaps(mdp, Q, problem.config.flow.scheme)
    state = int(np.argmin(ell)) if state is None else state
    b = bracket(mdp.space, log_gibbs_row(mdp, Q, state))
    return {"state": state, "ell": float(ell[state]), "tau": mdp.tau} | b.as_dict()
