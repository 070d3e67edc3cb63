"""Log-Sobolev and Poincaré constants of densities on the action mesh (pure functional inequalities).

Conventions (theory.md §5.1): LSI(C) is ``Ent_nu(f^2) <= (2/C) int |grad f|^2 dnu``; Poincaré(lambda) is
``Var_nu(f) <= (1/lambda) int |grad f|^2 dnu``; ``C <= lambda``; ``N(m, sigma^2)`` has ``C = lambda = 1/sigma^2``.

**Which density.** A density is given by its log at the DOFs (``log_density (M,)``, unnormalised, w.r.t.
Lebesgue). Between DOFs it is the *log-linear* interpolant ``nu_h = exp(I_h log nu)`` (the density the
exponentially fitted flow scheme sees), normalised to ``int nu_h = 1``. No floor is applied: the forms are
assembled in log space (:func:`forms`), so the log-density may span any number of decades (a floor would
change ``nu_h`` and create a spurious flat well). All constants below are those of ``nu_h`` on the meshed domain:

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
    ``e^{-W_q}`` has LSI(``lambda_min(H)``) (Bakry-Emery, theory.md §7.4) and ``psi = W_h - W_q`` perturbs it by
    ``exp(-osc psi)`` (Holley-Stroock). On a cell ``psi`` is linear minus convex, so its minimum is at a vertex
    and its maximum exceeds the vertex values by at most ``lambda_max(H) R_c^2 / 2`` (``R_c`` the
    circumradius: ``sum_i b_i |x_i - x|^2 <= R_c^2`` for barycentric ``b``).
  - "Holley-Stroock (uniform)": on an interval or an axis-aligned rectangle the uniform measure has
    ``C = pi^2 / max side^2`` (theory.md §7.4) and ``W_h`` is piecewise linear, so ``C >= C_unif exp(-osc W)``.
  - On a non-convex domain neither applies: lower bound 0, method "none (domain not convex)".

**The discrete generator** (theory.md §10.1): per state, the SG/EAFE (or SQRA) generator of a potential ``g`` is a
reversible chain on the DOFs with stationary masses ``pi_j = w_j e^{g_j} / Z`` and edge conductances
``q_e = pi_j L(j -> k)`` (:func:`log_conductances`, in log space). Its entropy-production (modified log-Sobolev)
constant ``rho_0`` is bracketed by :func:`mlsi_lower` (Diaconis-Saloff-Coste + Bobkov-Tetali, from the gap and
``log pi_*``; the exact statements are in its docstring) and :func:`mlsi_upper` (ratio minimisation); the gaps
along a flow are certified from below by :class:`GapTracker` (Sturm counts in 1D).

The along-flow rate check that uses these constants is :mod:`solver.along_flow`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import scipy.linalg as sla
import scipy.optimize as opt
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.spatial import ConvexHull

from . import bellman, budget
from .fem import ActionSpace
from .parallel import COMPILED_MIN_ENTRIES, compiled, single_threaded_blas

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
        log_nu: ``(M,)`` normalised log-density at the DOFs (no floor: any finite values).
        K: ``(M, M)`` sparse stiffness ``int nu_h grad phi_j . grad phi_k`` (entries of cells whose mass is
            below the smallest double underflow to 0; use ``K_scaled`` for eigenvalues).
        mass: ``(M, M)`` sparse consistent mass ``int nu_h phi_j phi_k`` (same remark).
        cell_nu: ``(C,)`` ``int_cell nu_h`` (cell mass).
        quad_mass: ``(C, q)`` quadrature masses ``m_cq = |c| omega_q nu_h(x_cq)`` (sum 1).
        log_mass_diag: ``(M,)`` ``log M_jj``, computed in log space (never ``-inf``).
        K_scaled, mass_scaled: ``D K D`` and ``D M D`` with ``D = diag(M)^{-1/2}``, assembled cell by cell from
            ``exp(log cell scale - (log M_jj + log M_kk) / 2)``, so that no factor under- or overflows however
            small the density is (``mass_scaled`` has unit diagonal).
    """

    log_nu: np.ndarray
    K: sp.csr_matrix
    mass: sp.csr_matrix
    cell_nu: np.ndarray
    quad_mass: np.ndarray
    log_mass_diag: np.ndarray
    K_scaled: sp.csr_matrix
    mass_scaled: sp.csr_matrix


def _log_scatter_sum(index: np.ndarray, log_values: np.ndarray, m: int) -> np.ndarray:
    """``log sum_{i: index_i = j} exp(log_values_i)`` for ``j < m`` (``-inf`` where nothing is scattered)."""
    top = np.full(m, -np.inf)
    np.maximum.at(top, index, log_values)
    total = np.bincount(index, weights=np.exp(log_values - top[index]), minlength=m)
    with np.errstate(divide="ignore"):
        return top + np.log(total)


def forms(space: ActionSpace, log_density: np.ndarray) -> Forms:
    """Assemble :class:`Forms` for ``log_density`` ``(M,)`` (vectorised over cells; no DOLFINx).

    Everything is computed from the log quadrature masses ``log m_cq = log(|c| omega_q) + sum_i lam_qi log nu_i``:
    no floor is applied to the log-density (a floor would change ``nu_h``: a plateau at ``max - floor`` is a
    spurious flat well with its own slow Neumann mode; with ``log nu`` spanning 814 at the tau = 0.1 LQR edge
    state it gave ``lambda = 0.416`` instead of 17.66).
    """
    geo = _geometry(space)
    log_nu = np.asarray(log_density, float)
    if log_nu.shape != (space.n_dofs,) or not np.all(np.isfinite(log_nu)):
        raise ValueError(f"log_density must be finite with shape ({space.n_dofs},)")
    log_nu = log_nu - log_nu.max()
    cells = space.cells
    lq = np.log(geo.volumes)[:, None] + np.log(geo.omega)[None, :] + log_nu[cells] @ geo.lam.T  # (C, q)
    top = float(lq.max())
    log_total = top + math.log(float(np.exp(lq - top).sum()))
    lq -= log_total
    log_nu = log_nu - log_total
    quad = np.exp(lq)
    cell_nu = quad.sum(axis=1)
    scale = lq.max(axis=1)  # (C,) log of each cell's largest quadrature mass
    rel = np.exp(lq - scale[:, None])  # (C, q), in (0, 1]
    m_rel = np.einsum("cq,qi,qk->cik", rel, geo.lam, geo.lam)
    k_rel = rel.sum(axis=1)[:, None, None] * np.einsum("cid,ckd->cik", geo.grads, geo.grads)
    n_local = cells.shape[1]
    M = space.n_dofs
    diag_local = scale[:, None] + np.log(np.einsum("cii->ci", m_rel))  # (C, d + 1) log of local diagonal masses
    log_diag = _log_scatter_sum(cells.ravel(), diag_local.ravel(), M)
    rows = np.repeat(cells, n_local, axis=1).ravel()
    cols = np.tile(cells, (1, n_local)).ravel()
    factor = np.exp(scale[:, None, None] - 0.5 * (log_diag[cells][:, :, None] + log_diag[cells][:, None, :]))
    K_scaled = sp.csr_matrix(((factor * k_rel).ravel(), (rows, cols)), shape=(M, M))
    mass_scaled = sp.csr_matrix(((factor * m_rel).ravel(), (rows, cols)), shape=(M, M))
    cell_scale = np.exp(scale)[:, None, None]
    K = sp.csr_matrix(((cell_scale * k_rel).ravel(), (rows, cols)), shape=(M, M))
    mass = sp.csr_matrix(((cell_scale * m_rel).ravel(), (rows, cols)), shape=(M, M))
    return Forms(log_nu=log_nu, K=K, mass=mass, cell_nu=cell_nu, quad_mass=quad, log_mass_diag=log_diag,
                 K_scaled=K_scaled, mass_scaled=mass_scaled)


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
    """Smallest non-zero eigenvalue of ``K f = lambda M f`` (Neumann, theory.md §5.1: ``N(m, s^2)`` has ``1/s^2``).

    Solved for the scaled pencil ``(D K D, D M D)``, ``D = diag(M)^{-1/2}``, assembled in log space
    (:class:`Forms`), so densities spanning any number of decades neither underflow nor spoil the conditioning;
    dense LAPACK up to :data:`DENSE_DOFS` DOFs, else ARPACK shift-invert at ``-s`` with ``s`` the Rayleigh
    quotient of the coordinate functions (``>= lambda``). The value returned is the Rayleigh quotient
    ``v^T Ks v / v^T Ms v`` of the computed scaled eigenvector ``v`` after projecting out the constants (in scaled
    coordinates ``c0 = diag(M)^{1/2}``, ``c0^T Ms c0 = 1``): an exact upper bound of the discrete gap, free of the
    cancellation in ``sigma + 1/theta``. The eigenfunction ``f = D v`` is returned where it is resolved
    (``M_jj >= e^-46`` relative to the total mass: ``v`` carries an absolute error ~1e-16); elsewhere it is
    clamped to the range of the resolved values (it only seeds :func:`lsi_upper`).
    """
    fm = forms(space, log_density) if fm is None else fm
    Ks, Ms = fm.K_scaled, fm.mass_scaled
    if space.n_dofs <= DENSE_DOFS:
        _, vec = sla.eigh(Ks.toarray(), Ms.toarray(), subset_by_index=(1, 1), check_finite=False)
        v = vec[:, 0]
    else:
        shift = min(_rayleigh(space, fm, space.coords[:, i]) for i in range(space.dim))
        _, vecs = spla.eigsh(Ks.tocsc(), k=2, M=Ms.tocsc(), sigma=-shift, which="LM")
        v = vecs[:, 1]  # ARPACK returns ascending: the constant (0) first
    c0 = np.exp(0.5 * fm.log_mass_diag)
    v = v - float(c0 @ (Ms @ v)) * c0
    value = float(v @ (Ks @ v)) / float(v @ (Ms @ v))
    f = _resolved(v, fm.log_mass_diag, fm.log_mass_diag >= -46.0)
    f = f - float(np.ones(space.n_dofs) @ (fm.mass @ f))
    f = f / math.sqrt(float(f @ (fm.mass @ f)))
    return Poincare(value=value, f=f)


def _resolved(v: np.ndarray, log_diag: np.ndarray, resolved: np.ndarray) -> np.ndarray:
    """``f = v / sqrt(M_jj)`` where ``resolved``, clamped elsewhere to the range of the resolved values."""
    f = np.empty_like(v)
    f[resolved] = v[resolved] * np.exp(-0.5 * log_diag[resolved])
    lo, hi = f[resolved].min(), f[resolved].max()
    f[~resolved] = np.where(v[~resolved] >= 0, hi, lo)
    return f


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
    if _chain_cells(space):  # cells (i, i + 1): the same maxima without the (N, C, 2) gather
        cell_max = np.maximum(psi[:, :-1], psi[:, 1:])
    else:
        cell_max = psi[:, space.cells].max(axis=2)
    cell_max += 0.5 * curvature[:, None] * geo.circumradius2[None, :]
    osc = cell_max.max(axis=1) - psi.min(axis=1)
    return np.where(kappa > 0, np.maximum(kappa, 0.0) * np.exp(-osc), 0.0)


def _convex_minorant_1d(a: np.ndarray, f: np.ndarray) -> np.ndarray:
    """The greatest convex minorant of ``f (N, M)`` at the sorted nodes ``a (M,)``: per row, the lower convex hull
    of the points ``(a_j, f_j)`` (its vertices keep their values) interpolated linearly at the other nodes. It is
    the largest convex piecewise-linear function ``<= f`` at the nodes, so ``f - phi >= 0`` is smallest, and its
    oscillation too (both vanish at the hull's vertices): the best split of this form.

    Compiled (:func:`_hull_kernel`, Andrew's monotone chain, ``O(M)`` per row) where :func:`_compiled_size` says
    so, else :func:`_hull_rows` (the same predicate, vectorised over rows; a few sweeps). A point is dropped
    when it is on or above the chord of its neighbours, both paths with the same expression, and the interpolation
    is the same expression too: where the vertex sets agree (any data without three points collinear to round-off)
    the values agree bit for bit; otherwise they differ by round-off of near-collinear points."""
    a = np.ascontiguousarray(a, dtype=float)
    f = np.ascontiguousarray(f, dtype=float)
    kernel = compiled(_hull_kernel, HULL_SIGNATURE) if _compiled_size(f.size) else None
    if kernel is not None and np.isfinite(f.min()) and np.isfinite(f.max()):
        out = np.empty(f.shape)
        kernel(a, f, out, np.empty(f.shape[1], np.int64))
        return out
    return _hull_rows(a, f)


def _hull_rows(a: np.ndarray, f: np.ndarray) -> np.ndarray:
    """:func:`_convex_minorant_1d` in numpy: sweeps that drop, in every row at once, each kept point on or above
    the chord of its kept neighbours (never a vertex of the lower hull, so dropping them together is safe) until
    none is; the kept points are then the hull's vertices."""
    n, m = f.shape
    idx = np.arange(m)
    rows = np.arange(n)[:, None]
    keep = np.ones((n, m), bool)

    def neighbours():
        """Last kept node ``<= j`` and first kept node ``>= j``, ``(n, M)`` each."""
        left = np.maximum.accumulate(np.where(keep, idx, -1), axis=1)
        right = np.minimum.accumulate(np.where(keep, idx, m)[:, ::-1], axis=1)[:, ::-1]
        return left, right

    while m > 2:
        left, right = neighbours()
        p = np.empty_like(left)
        q = np.empty_like(right)
        p[:, 0], p[:, 1:] = -1, left[:, :-1]
        q[:, -1], q[:, :-1] = m, right[:, 1:]
        inner = keep & (p >= 0) & (q < m)
        if not inner.any():
            break
        p, q = np.where(inner, p, 0), np.where(inner, q, 0)
        fp = f[rows, p]
        drop = inner & ((f - fp) * (a[q] - a[p]) >= (f[rows, q] - fp) * (a[None, :] - a[p]))
        if not drop.any():
            break
        keep &= ~drop
    left, right = neighbours()
    fl, fr, al = f[rows, left], f[rows, right], a[left]
    span = a[right] - al
    with np.errstate(invalid="ignore", divide="ignore"):
        inside = fl + (fr - fl) * ((a[None, :] - al) / span)
    return np.where(keep, f, inside)


HULL_SIGNATURE = "void(f8[::1], f8[:, ::1], f8[:, ::1], i8[::1])"


def _hull_kernel(a, f, out, stack):
    """Compiled :func:`_convex_minorant_1d` (finite ``f``): per row the lower hull by Andrew's monotone chain (a
    point is popped when on or above the chord from the one below it to the new point: the predicate of
    :func:`_hull_rows`), then the interpolation of :func:`_hull_rows` between consecutive vertices."""
    n, m = f.shape
    for r in range(n):
        top = 0
        for j in range(m):
            while top >= 2:
                i, k = stack[top - 2], stack[top - 1]
                if (f[r, k] - f[r, i]) * (a[j] - a[i]) >= (f[r, j] - f[r, i]) * (a[k] - a[i]):
                    top -= 1
                else:
                    break
            stack[top] = j
            top += 1
        for v in range(top - 1):
            i, k = stack[v], stack[v + 1]
            out[r, i] = f[r, i]
            span = a[k] - a[i]
            for j in range(i + 1, k):
                out[r, j] = f[r, i] + (f[r, k] - f[r, i]) * ((a[j] - a[i]) / span)
        out[r, stack[top - 1]] = f[r, stack[top - 1]]


def _compiled_size(entries: int) -> bool:
    """Whether a compiled kernel of this module is worth it for ``entries`` values: from
    :data:`solver.parallel.COMPILED_MIN_ENTRIES` on, or for any size once numba is imported (the run's own
    compiled kernels imported it: a group of 8 states of lqr_1d is 2056 entries), so that small problems never
    import numba for the checks alone."""
    import sys

    return entries >= COMPILED_MIN_ENTRIES or (entries >= 64 and "numba" in sys.modules)


def lower_bounds(space: ActionSpace, log_densities: np.ndarray, good_enough: np.ndarray | None = None,
                 around: np.ndarray | None = None, steps_out: np.ndarray | None = None,
                 offsets: tuple = (-1, 0, 1)) -> tuple[np.ndarray, np.ndarray]:
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
        good_enough: ``(N,)`` or None: the split (family 2, the costly one: ``O(P M)`` per density and ``kappa``)
            is tried only for the densities whose quadratic-fit bound is below this value (default: all). Every
            value returned is a valid bound either way.
        around: ``(N,)`` indices into :data:`KAPPA_STEPS` (e.g. the best ones of the previous snapshot, -1 for
            none): try only that step and its two neighbours instead of all of them (warm start along a flow).
        steps_out: ``(N,)`` int array or None: receives the index of the best split step (-1: not tried).
        offsets: with ``around``, the steps tried relative to it (``(0,)``: that step only, a cheaper bound).

    Returns:
        ``(value (N,), method (N,) int)``: the best bound and its index in :data:`LOWER_METHODS`.
    """
    geo = _geometry(space)
    logs = np.atleast_2d(np.asarray(log_densities, float))
    n = logs.shape[0]
    if not geo.convex:
        return np.zeros(n), np.zeros(n, int)
    W = -(logs - logs.max(axis=1, keepdims=True))  # (N, M), min 0; no floor (the bounds are for nu_h itself)
    d = space.dim
    a = space.coords
    lo, hi = a.min(axis=0), a.max(axis=0)
    x = a - 0.5 * (lo + hi)  # conditioning of the fits
    design, solve = _fits(space)
    coef = solve @ W.T  # (P, N): the least-squares quadratic fit (pseudo-inverse of the constant design)
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
    affine_solve = _fits(space, affine=True)[1]
    tried = np.ones(n, bool) if good_enough is None else ~(fitted >= np.asarray(good_enough, float))
    Wt, k0 = W[tried], kappa0[tried]
    nt = int(tried.sum())
    best_split, best_index = np.zeros(nt), np.full(nt, -1)
    if around is None:
        index_sets = [np.full(nt, i) for i in range(KAPPA_STEPS.size)]
    else:  # the previous best step and its two neighbours
        centre = np.asarray(around, int)[tried]
        centre = np.where(centre < 0, 1, centre)
        index_sets = [np.clip(centre + o, 0, KAPPA_STEPS.size - 1) for o in offsets]
    for index in index_sets if nt else ():
        kappa = k0 * 2.0 ** -KAPPA_STEPS[index].astype(float)
        f = Wt - 0.5 * kappa[:, None] * r2[None, :]
        if d == 1 and space.is_chain:
            phi = _convex_minorant_1d(a[:, 0], f)
        else:
            phi = (affine @ (affine_solve @ f.T)).T
        value = _split_bound(space, f - phi, kappa, kappa)
        better = value > best_split
        best_split = np.where(better, value, best_split)
        best_index = np.where(better, index, best_index)
    split[tried] = best_split
    if steps_out is not None:
        steps_out[:] = -1
        steps_out[tried] = best_index
    if geo.box_side is not None:
        hs = math.pi ** 2 / geo.box_side ** 2 * np.exp(-(W.max(axis=1) - W.min(axis=1)))
    else:
        hs = np.zeros(n)
    candidates = np.stack([fitted, split, hs])  # methods 1, 2, 3
    best = np.argmax(candidates, axis=0)
    value = candidates[best, np.arange(n)]
    return value, np.where(value > 0, best + 1, 4)


_FITS: dict[tuple[int, bool], tuple] = {}
_CHAINS: dict[int, tuple] = {}


def _chain_cells(space: ActionSpace) -> bool:
    """True if the cells of ``space`` are ``(0, 1), (1, 2), ...`` in this order (cached per action space)."""
    entry = _CHAINS.get(id(space))
    if entry is None or entry[0] is not space:
        c = np.asarray(space.cells)
        chain = space.dim == 1 and c.ndim == 2 and c.shape[1] == 2 and np.array_equal(
            c, np.column_stack([np.arange(c.shape[0]), np.arange(c.shape[0]) + 1]))
        entry = (space, bool(chain))
        _CHAINS[id(space)] = entry
    return entry[1]


def _fits(space: ActionSpace, affine: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(design, pinv(design))`` of the quadratic (or affine) least-squares fits of :func:`lower_bounds` at the
    centred DOFs, cached per action space object (the design is constant: one SVD per mesh, not per call)."""
    entry = _FITS.get((id(space), affine))
    if entry is None or entry[0] is not space:
        a = space.coords
        design = _quadratic_design(a - 0.5 * (a.min(axis=0) + a.max(axis=0)))
        if affine:
            design = design[:, :1 + space.dim]
        entry = (space, design, np.linalg.pinv(design))
        _FITS[(id(space), affine)] = entry
    return entry[1], entry[2]


def lsi_lower(space: ActionSpace, log_density: np.ndarray) -> tuple[float, str]:
    """Best closed-form LSI lower bound of one density and its method name."""
    value, method = lower_bounds(space, np.asarray(log_density)[None, :])
    return float(value[0]), LOWER_METHODS[int(method[0])]


# ----------------------------------------------------------------------------------------------------------
# the bracket


@dataclass(frozen=True)
class LSIBracket:
    """``lower <= C_LSI <= upper <= poincare`` with the method at each end (convention theory.md §5.1)."""

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


def log_gibbs_row(mdp, Q: np.ndarray, state: int) -> np.ndarray:
    """``log G^Q_s`` at one state, ``(M,)``, without the ``(N, M)`` temporaries of the whole table."""
    return bellman.log_gibbs(mdp, Q[state:state + 1])[0][0]


def many_lower_bounds(space: ActionSpace, log_densities: np.ndarray, good_enough: np.ndarray | None = None,
                      around: np.ndarray | None = None,
                      offsets: tuple = (-1, 0, 1)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`lower_bounds` of the log-densities ``(N, M)`` (unnormalised) in chunks of states, so that the
    temporaries (several per cell and state) do not grow with ``N``; ``good_enough``, ``around`` ``(N,)`` and
    ``offsets`` as there. Returns ``(value, method, best split step index)``, each ``(N,)``."""
    n = log_densities.shape[0]
    good_enough = np.full(n, np.inf) if good_enough is None else np.asarray(good_enough, float)
    centre = np.full(n, -1) if around is None else np.asarray(around, int)

    def chunk(logs, ge, c):
        steps = np.empty(logs.shape[0], int)
        value, method = lower_bounds(space, logs, ge, None if around is None else c, steps, offsets)
        return np.column_stack([value, method, steps])

    both = budget.by_state_chunks(space, chunk, log_densities, good_enough, centre)
    return both[:, 0], both[:, 1].astype(int), both[:, 2].astype(int)


def gibbs_lower_bounds(mdp, Q: np.ndarray, good_enough: np.ndarray | None = None,
                       around: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`many_lower_bounds` of the Gibbs policies ``G^Q_s`` of every state (log-Gibbs computed per chunk)."""
    n = Q.shape[0]
    good_enough = np.full(n, np.inf) if good_enough is None else np.asarray(good_enough, float)
    centre = np.full(n, -1) if around is None else np.asarray(around, int)

    def chunk(q, ge, c):
        return np.column_stack(many_lower_bounds(mdp.space, bellman.log_gibbs(mdp, q)[0], ge,
                                                 None if around is None else c))

    both = budget.by_state_chunks(mdp.space, chunk, Q, good_enough, centre)
    return both[:, 0], both[:, 1].astype(int), both[:, 2].astype(int)


# ----------------------------------------------------------------------------------------------------------
# the discrete generator: certified entropy-production (modified log-Sobolev) constants (theory.md §10.1)
#
# A reversible chain is given by its log stationary masses ``log_pi (M,)`` (normalised), its edges ``(E, 2)``
# and the log edge conductances ``log_q (E,)``, ``q_e = pi_j L(j -> k) = pi_k L(k -> j)``. Its Dirichlet form is
# ``E(f, g) = sum_e q_e (f_j - f_k)(g_j - g_k)``; ``-L`` has the spectral gap ``ell = min E(f, f) / Var_pi(f)``.


def log_bernoulli(x: np.ndarray) -> np.ndarray:
    """``log B(x) = log(x / (e^x - 1))`` without under- or overflow (``log B(0) = 0``)."""
    x = np.asarray(x, float)
    # x > 0: log x - x - log(1 - e^-x) (e^x - 1 = e^x (1 - e^-x)); x < 0: log(-x) - log(1 - e^x) (x / (e^x - 1) =
    # -x / (1 - e^x)); both are log|x| - max(x, 0) - log(-expm1(-|x|)), one formula for every entry (expm1: no
    # cancellation in 1 - e^-|x| at small |x|, where log1p(-exp(-|x|)) lost up to 1e-8 of B)
    ax = np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(ax)
        out -= np.maximum(x, 0.0)
        out -= np.log(-np.expm1(-ax))
    small = ax < 1e-8  # B(x) = 1 - x/2 + O(x^2)
    if small.any():
        out[small] = -0.5 * x[small]
    return out


def log_stationary(space: ActionSpace, g: np.ndarray) -> np.ndarray:
    """Log Gibbs masses ``log pi_j = log(w_j e^{g_j}) - log sum_k w_k e^{g_k}``, ``(n, M)`` for ``g (n, M)``."""
    x = np.atleast_2d(g) + np.log(space.weights)[None, :]
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def log_conductances(space: ActionSpace, g: np.ndarray, tau: float, scheme: str = "sg") -> np.ndarray:
    """``log q_e`` of the SG/EAFE (or SQRA) generator of the potentials ``g (n, M)``, ``(n, E)``.

    With ``fwd = tau omega_jk B(-dg)`` (:func:`solver.flows.fokker_planck.edge_rates`, rate per unit density
    from ``j`` to ``k``), the rate per unit mass is ``fwd / w_j``, so ``q_e = pi_j fwd / w_j = G_j fwd``
    (``G_j = pi_j / w_j``, ``sum_j w_j G_j = 1``); detailed balance ``G_j B(-dg) = G_k B(dg)`` makes it symmetric.
    Computed in log space (``omega = 0`` gives ``-inf``, a missing edge). The generator includes ``tau``.
    """
    if scheme not in ("sg", "sqra"):
        raise ValueError(f"unknown scheme {scheme!r} (allowed: sg, sqra)")
    g = np.atleast_2d(g)
    return _log_conductances(space, g, tau, scheme, log_stationary(space, g))


def _log_conductances(space: ActionSpace, g: np.ndarray, tau: float, scheme: str, log_pi: np.ndarray) -> np.ndarray:
    """:func:`log_conductances` given ``log_pi = log_stationary(space, g)``."""
    j, k = space.edges[:, 0], space.edges[:, 1]
    dg = g[:, k] - g[:, j]
    with np.errstate(divide="ignore"):
        log_scale = np.log(tau * space.conductance)[None, :]
    log_fwd = log_scale + (log_bernoulli(-dg) if scheme == "sg" else 0.5 * dg)
    return log_pi[:, j] - np.log(space.weights)[j][None, :] + log_fwd


def chain_gap(log_pi: np.ndarray, edges: np.ndarray, log_q: np.ndarray) -> tuple[float, np.ndarray]:
    """Spectral gap of ``-L`` and its eigenfunction ``f`` (``E_pi f = 0``, ``E_pi f^2 = 1``) by a dense eigen-solve.

    ``-L`` is similar to ``S = Pi^{1/2} (-L) Pi^{-1/2}`` with ``S_jj = sum_e q_e / pi_j`` and
    ``S_jk = -q_e / sqrt(pi_j pi_k)``, each formed from the logs (for small chains and tests; the flow's states
    use :func:`solver.diagnostics.generator_gaps`, the same symmetrisation edge by edge).
    """
    m = log_pi.size
    j, k = edges[:, 0], edges[:, 1]
    S = np.zeros((m, m))
    off = -np.exp(log_q - 0.5 * (log_pi[j] + log_pi[k]))
    S[j, k] = S[k, j] = off
    S[np.arange(m), np.arange(m)] = (np.bincount(j, np.exp(log_q - log_pi[j]), m)
                                     + np.bincount(k, np.exp(log_q - log_pi[k]), m))
    values, vectors = sla.eigh(S, subset_by_index=(1, 1))
    return float(values[0]), vectors[:, 0] * np.exp(-0.5 * log_pi)


def mlsi_lower(gap: np.ndarray, log_pi_min: np.ndarray) -> np.ndarray:
    """Certified lower bound of the entropy-production constant ``rho_0`` from the gap and ``log pi_*``.

    ``rho_0`` is the best constant in ``rho_0 Ent_pi(u) <= E(u, log u)`` for ``u > 0`` (theory.md §10.1; Bobkov and
    Tetali 2006 call it the modified log-Sobolev constant); ``E(u, log u)`` is the entropy production,
    ``d/dt KL(m || pi) = -E(u, log u)`` for ``dm/dt = L m``, ``u = m / pi``. The bound chains two facts:

    1. **Diaconis and Saloff-Coste (1996), Appendix, Theorem A.1 and its corollary**: on a finite set with
       ``pi_* = min pi``, the chain ``K(x, y) = pi(y)`` (whose Dirichlet form is ``Var_pi``) has log-Sobolev
       constant exactly ``(1 - 2 pi_*) / log(1/pi_* - 1)`` (``1/2`` at ``pi_* = 1/2``); their LSI constant is
       ``alpha = inf E(f, f) / L(f)`` with ``L(f) = sum pi f^2 log(f^2 / ||f||_2^2) = Ent_pi(f^2)``. Hence, since
       ``E(f, f) >= ell Var_pi(f)``, every reversible chain has
       ``alpha >= ell (1 - 2 pi_*) / log(1/pi_* - 1)``.
    2. ``(a - b)(log a - log b) >= 4 (sqrt a - sqrt b)^2`` for ``a, b > 0`` (Bobkov-Tetali 2006, and DSC), so
       ``E(u, log u) >= 4 E(sqrt u, sqrt u) >= 4 alpha Ent_pi(u)``: ``rho_0 >= 4 alpha``.

    So ``rho_0 >= 4 (1 - 2 pi_*) ell / log(1/pi_* - 1)``, with ``log(1/pi_* - 1) = -log pi_* + log1p(-pi_*)``
    evaluated from ``log pi_*`` (no underflow however small ``pi_*`` is). Upper end for comparison: ``rho_0 <= 2 ell``
    (``u = 1 + eps f`` with the gap eigenfunction ``f``: ``E(u, log u) = eps^2 E(f, f) + O(eps^3)``,
    ``Ent(u) = eps^2 Var(f) / 2 + O(eps^3)``), so the bound loses at most the factor
    ``log(1/pi_* - 1) / (2 (1 - 2 pi_*))``.
    Continuum check: ``alpha = tau C / 2`` in the theory.md §5.1 convention, so ``4 alpha = 2 tau C``.

    Args:
        gap: ``(n,)`` spectral gaps ``ell`` of ``-L`` (the generator includes ``tau``).
        log_pi_min: ``(n,)`` ``log pi_*`` (``<= log(1/2)`` unless the chain has one or two points).

    Returns:
        ``(n,)`` lower bounds of ``rho_0`` (``>= 0``).
    """
    gap = np.asarray(gap, float)
    lp = np.minimum(np.asarray(log_pi_min, float), math.log(0.5))
    pi_min = np.exp(lp)
    log_odds = -lp + np.log1p(-pi_min)  # log(1/pi_* - 1) >= 0
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = np.where(log_odds > 1e-12, (1.0 - 2.0 * pi_min) / np.maximum(log_odds, 1e-300), 0.5)
    return 4.0 * factor * np.maximum(gap, 0.0)


def mlsi_ratio(v: np.ndarray, log_pi: np.ndarray, edges: np.ndarray, log_q: np.ndarray) -> tuple[float, np.ndarray]:
    """``R(u) = E(u, log u) / Ent_pi(u)`` for ``u = exp(v)`` and its gradient ``dR/dv``.

    ``E(u, log u) = sum_e q_e (u_j - u_k)(v_j - v_k)``; ``Ent_pi(u) = sum_j pi_j u_j (v_j - log S)``,
    ``S = sum_j pi_j u_j``. ``R`` is invariant under ``v -> v + c`` (``v`` is shifted to ``max v = 0``, so
    nothing overflows). Returns ``(inf, 0)`` if the entropy is not positive (``u`` constant to round-off).
    """
    v = v - v.max()
    j, k = edges[:, 0], edges[:, 1]
    pu = np.exp(log_pi + v)
    S = float(pu.sum())
    y = v - math.log(S)
    ent = float(pu @ y)
    a_j, a_k = np.exp(log_q + v[j]), np.exp(log_q + v[k])
    dv = v[j] - v[k]
    E = float((a_j - a_k) @ dv)
    if not ent > 1e-13 * S:
        return math.inf, np.zeros_like(v)
    R = E / ent
    dE = np.bincount(j, a_j * dv + (a_j - a_k), v.size) - np.bincount(k, a_k * dv + (a_j - a_k), v.size)
    return R, (dE - R * pu * y) / ent


#: :func:`mlsi_upper` computes the gap eigenfunction (a dense eigen-solve) as a start up to this many states.
DENSE_START_DOFS = 300


@dataclass(frozen=True)
class MLSIUpper:
    """Result of :func:`mlsi_upper`: ``value`` (an upper bound of ``rho_0``), the start that gave it, every start."""

    value: float
    start: str
    by_start: dict


def mlsi_upper(log_pi: np.ndarray, edges: np.ndarray, log_q: np.ndarray, gap: float | None = None,
               coords: np.ndarray | None = None, seed: int = 0, random_starts: int = 2,
               maxiter: int = 300) -> MLSIUpper:
    """Upper bound of ``rho_0``: ``min(2 ell, min over starts of the L-BFGS minimum of`` :func:`mlsi_ratio` ``)``.

    Every value is the ratio of an actual ``u > 0`` (or the limit ``2 ell``), hence an upper bound. Starts for
    ``v = log u``: small multiples of the gap eigenfunction (dense, up to :data:`DENSE_START_DOFS` states, or
    whenever ``gap`` is not given), the tilts
    ``t (-log pi)`` towards the light states (``t = 1/4, 1/2``), exponential tilts ``+-beta . a`` along each
    coordinate of ``coords`` (``beta = 1/2, 2`` over its standard deviation), and ``random_starts`` Gaussian ones.
    """
    m = log_pi.size
    starts: dict[str, np.ndarray] = {}
    if gap is None or m <= DENSE_START_DOFS:
        gap_dense, f = chain_gap(log_pi, edges, log_q)
        gap = gap_dense if gap is None else min(gap, gap_dense)
        f = np.clip(f, -1e6, 1e6)
        starts["1+eps*f"] = np.log1p(0.2 * f / np.max(np.abs(f)))
    centred = -log_pi - float(np.exp(log_pi) @ -log_pi)
    for t in (0.25, 0.5):
        starts[f"pi^-{t}"] = t * centred
    if coords is not None:
        x = np.asarray(coords, float).reshape(m, -1)
        pi = np.exp(log_pi)
        for i in range(x.shape[1]):
            xc = x[:, i] - pi @ x[:, i]
            sd = math.sqrt(max(float(pi @ xc ** 2), 1e-300))
            for scale in (0.5, 2.0):
                for sign in (1, -1):
                    starts[f"exp({sign * scale:g} a_{i} / sd)"] = sign * scale / sd * xc
    rng = np.random.default_rng(seed)
    for n in range(random_starts):
        starts[f"random #{n}"] = rng.normal(size=m)
    best = ("2 ell (limit u = 1 + eps f)", 2.0 * gap)
    by_start = {best[0]: best[1]}
    for label, v0 in starts.items():
        res = opt.minimize(mlsi_ratio, v0, args=(log_pi, edges, log_q), jac=True, method="L-BFGS-B",
                           options={"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-10})
        value = mlsi_ratio(res.x, log_pi, edges, log_q)[0]  # the ratio of the returned point itself
        by_start[label] = value
        if value < best[1]:
            best = (label, value)
    return MLSIUpper(value=float(best[1]), start=best[0], by_start=by_start)


@dataclass(frozen=True)
class CertifiedBracket:
    """``lower <= rho_0 <= upper`` for one state's generator, with ``gap = ell`` and ``log_pi_min = log pi_*``."""

    lower: float
    upper: float
    upper_start: str
    gap: float
    log_pi_min: float

    def as_dict(self) -> dict:
        return asdict(self)


def certified_bracket(space: ActionSpace, g: np.ndarray, tau: float, gap: float, scheme: str = "sg",
                      seed: int = 0) -> CertifiedBracket:
    """:func:`mlsi_lower` and :func:`mlsi_upper` of the frozen generator of the potential ``g (M,)``.

    ``gap`` is ``ell`` of that generator (:func:`solver.diagnostics.generator_gaps`).
    """
    log_pi = log_stationary(space, g)[0]
    log_q = log_conductances(space, g, tau, scheme)[0]
    keep = np.isfinite(log_q)
    upper = mlsi_upper(log_pi, space.edges[keep], log_q[keep], gap, space.coords, seed)
    lower = float(mlsi_lower(np.array([gap]), np.array([log_pi.min()]))[0])
    return CertifiedBracket(lower=lower, upper=upper.value, upper_start=upper.start, gap=float(gap),
                            log_pi_min=float(log_pi.min()))


def log_min_masses(space: ActionSpace, g: np.ndarray) -> np.ndarray:
    """``log pi_* = min_j log(w_j G_j)`` per state for potentials ``g (N, M)``, ``(N,)`` (in chunks of states)."""
    return budget.by_state_chunks(space, lambda gc: log_stationary(space, gc).min(axis=1), g)


# ----------------------------------------------------------------------------------------------------------
# certified generator gaps along a flow (cheap, warm-started)

#: Relative safety margin applied to gaps from an eigensolver (LAPACK bisection, ARPACK): their error is far below
#: it (~1e-12 relative), so ``(1 - GAP_SAFETY) ell`` is a lower bound. Sturm-certified gaps need none.
GAP_SAFETY = 1e-6

#: Weyl steps (2D, :func:`gap_lower_bounds`) are accepted while they lose at most this fraction of the gap (1%:
#: the certified margins are 20 to 800, so 1% of the bound is immaterial against an eigen-solve per state).
WEYL_LOSS = 1e-2

#: :class:`GapTracker` keeps the 2D reference matrices of the Weyl step only up to this size.
REFERENCE_BYTES = 64 * 2 ** 20

#: Warm-start grid (multiples of the previous gap) tested by Sturm sweeps in 1D (:func:`gap_lower_bounds`).
STURM_GRID = np.array([0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 1.0, 1.0005, 1.001, 1.002, 1.005,
                       1.01, 1.02, 1.05, 1.1, 1.25])

#: The points of :data:`STURM_GRID` tested first (0.9995, 1, 1.0005): a state with at most one eigenvalue below
#: the first and more below the last is decided by these three, as by the whole grid, since the Sturm count is
#: monotone in the shift also in floating point (Kahan 1966; LAPACK's bisection relies on it); the others test
#: only the grid points above (or below) these. Near the optimum, where the gaps move by less than 0.05% between
#: checks, that is every state: 3 shifts per state, not 19; early in a flow at most 11.
STURM_FIRST = np.array([8, 9, 10])


def symmetrised_generator(space: ActionSpace, g: np.ndarray, tau: float,
                          scheme: str = "sg") -> tuple[np.ndarray, np.ndarray]:
    """``S = Pi^{1/2} (-L) Pi^{-1/2}`` of the generators of the potentials ``g (n, M)``: ``(diag (n, M), off (n, E))``,
    ``S_jj = sum_e q_e / pi_j``, ``S_jk = -q_e / sqrt(pi_j pi_k)`` from the logs (the symmetrisation edge by edge,
    as :func:`solver.diagnostics.generator_gaps`; nothing under- or overflows)."""
    return _symmetrised(space, g, tau, scheme)[:2]


#: :func:`_symmetrised` forms ``S`` from the flow's edge rates where every ``fwd bwd`` of a state is at least this
#: (far above the subnormals, so ``sqrt(fwd bwd)`` keeps full precision; every conductance is positive,
#: :func:`solver.fem._renumbered`).
RATE_PRODUCT_MIN = 1e-280


def _symmetrised(space: ActionSpace, g: np.ndarray, tau: float, scheme: str,
                 rates: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`symmetrised_generator` and the ``log_pi (n, M)`` (:func:`log_stationary`) it was formed with.

    ``rates``: the edge rates ``(fwd, bwd)`` of ``g`` (:func:`solver.flows.fokker_planck.edge_rates`, those the
    flow steps with) if the caller has them. Then ``S_jk = -sqrt(fwd bwd / (w_j w_k))`` and ``S_jj`` sums
    ``fwd / w_j`` and ``bwd / w_k`` (detailed balance ``pi_j fwd / w_j = pi_k bwd / w_k`` gives the same entries:
    a square root and two divisions per edge instead of five transcendental functions), at the states whose
    products ``fwd bwd`` are all at least :data:`RATE_PRODUCT_MIN`; the others (potential jumps of hundreds per
    edge) are formed from the logs."""
    if scheme not in ("sg", "sqra"):
        raise ValueError(f"unknown scheme {scheme!r} (allowed: sg, sqra)")
    g = np.atleast_2d(g)
    log_pi = log_stationary(space, g)
    j, k = space.edges[:, 0], space.edges[:, 1]
    w = space.weights
    n = g.shape[0]
    linear = np.zeros(n, bool)
    if rates is not None:
        fwd, bwd = rates
        product = fwd * bwd
        linear = np.all(product >= RATE_PRODUCT_MIN, axis=1)
    off, out_j, out_k = (np.empty((n, j.size)) for _ in range(3))
    if linear.any():
        r = slice(None) if linear.all() else np.flatnonzero(linear)
        off[r] = np.sqrt(product[r]) / -np.sqrt(w[j] * w[k])[None, :]
        out_j[r], out_k[r] = fwd[r] / w[j][None, :], bwd[r] / w[k][None, :]
    if not linear.all():
        r = np.flatnonzero(~linear)
        lp = log_pi[r]
        log_q = _log_conductances(space, g[r], tau, scheme, lp)
        off[r] = -np.exp(log_q - 0.5 * (lp[:, j] + lp[:, k]))
        out_j[r], out_k[r] = np.exp(log_q - lp[:, j]), np.exp(log_q - lp[:, k])
    if space.is_chain:  # node i is the start of edge i and the end of edge i - 1: one term each, no sums
        diag = np.zeros(g.shape)
        diag[:, :-1] = out_j
        diag[:, 1:] += out_k
        return diag, off, log_pi
    inc_j, inc_k = space.incidences
    return out_j @ inc_j + out_k @ inc_k, off, log_pi


#: The 2D gap solve factorises in band storage (reverse Cuthill-McKee order) while ``bandwidth^2 M`` is at most
#: this (a banded Cholesky costs ``M b^2``: 2.9e6 at 1201 DOFs, b = 49, 0.5 ms); else SuperLU.
BAND_WORK = 64e6

#: Lanczos vectors of the ARPACK solve in :func:`deflated_gap` (one eigenvalue, well separated after deflation).
LANCZOS_VECTORS = 8

#: ARPACK's relative tolerance on the Ritz value in :func:`deflated_gap`: a symmetric eigenvalue is within the
#: residual of its Ritz value, so the relative error is below this, far below :data:`GAP_SAFETY`.
LANCZOS_TOL = 1e-10


@dataclass(frozen=True)
class Band:
    """Band storage of the symmetric matrices on a mesh's edge graph, in reverse Cuthill-McKee order.

    ``perm (M,)``: node of each position; ``inv (M,)``: position of each node; ``width``: the bandwidth ``b``;
    ``row, col (E,)``: where the entry of edge ``e`` goes in LAPACK's upper band storage ``ab (b + 1, M)``
    (``ab[b + i - j, j] = A_ij`` for positions ``i <= j``).
    """

    perm: np.ndarray
    inv: np.ndarray
    width: int
    row: np.ndarray
    col: np.ndarray


def band(space: ActionSpace) -> Band:
    """The :class:`Band` of the edge graph of ``space`` (computed once per action space object)."""
    entry = _BANDS.get(id(space))
    if entry is None or entry[0] is not space:
        from scipy.sparse.csgraph import reverse_cuthill_mckee

        m = space.n_dofs
        j, k = space.edges[:, 0], space.edges[:, 1]
        graph = sp.coo_matrix((np.ones(j.size), (j, k)), shape=(m, m))
        perm = np.asarray(reverse_cuthill_mckee((graph + graph.T).tocsr(), symmetric_mode=True), dtype=np.int64)
        inv = np.empty(m, np.int64)
        inv[perm] = np.arange(m)
        lo, hi = np.minimum(inv[j], inv[k]), np.maximum(inv[j], inv[k])
        width = int((hi - lo).max(initial=0))
        entry = (space, Band(perm=perm, inv=inv, width=width, row=width + lo - hi, col=hi))
        _BANDS[id(space)] = entry
    return entry[1]


_BANDS: dict[int, tuple[ActionSpace, Band]] = {}


def deflated_gap(bd: Band, diag: np.ndarray, off: np.ndarray, log_pi: np.ndarray,
                 v0: np.ndarray | None = None, ab: np.ndarray | None = None) -> tuple[float, np.ndarray] | None:
    """The generator gap from one banded Cholesky: ``lambda_1(S + c u u^T)`` with ``u = sqrt(pi)`` (unit norm).

    ``S`` (``diag (M,)``, ``off (E,)``, :func:`symmetrised_generator`) has the null vector ``u``; for any unit ``u``
    and ``c >= 0`` the rank-one interlacing ``lambda_1(S + c u u^T) <= lambda_2(S) = ell`` holds, with equality
    when ``S u = 0`` and ``c >= ell`` (``c = 2 max diag``: ``(M - 1) ell <= trace S``). So the value is a lower
    bound of ``ell`` whatever the round-off in ``u``, and ``ell`` itself to round-off. It is the largest
    eigenvalue of ``(S - sigma + c u u^T)^{-1}`` (``sigma = -1e-3 mean diag``, positive definite): ARPACK
    (Lanczos, ``k = 1``, started from ``v0``, the previous eigenvector) on the banded Cholesky factor of
    ``S - sigma`` with the Sherman-Morrison correction (two band solves per step, no null eigenvalue to find).
    Cost ``O(M b^2)`` once plus ``O(M b)`` per Lanczos step. ``ab``: a ``(b + 1, M)`` workspace that is zero off
    the band pattern (reused between calls).
    Returns ``(ell, eigenvector (M,))``, or None if the Cholesky factorisation fails (the caller then takes the
    SuperLU route).
    """
    m, b = diag.size, bd.width
    shift = -1e-3 * float(np.mean(diag))
    ab = np.zeros((b + 1, m)) if ab is None else ab
    ab[b, bd.inv] = diag - shift
    ab[bd.row, bd.col] = off
    try:
        factor = sla.cholesky_banded(ab, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    u = np.exp(0.5 * (log_pi[bd.perm] - log_pi.max()))
    u /= np.linalg.norm(u)
    c = 2.0 * float(diag.max())
    w = sla.cho_solve_banded((factor, False), u, check_finite=False)  # A^{-1} u, A = S - sigma (symmetric)
    scale = c / (1.0 + c * float(u @ w))
    start = None if v0 is None or not np.any(v0) else v0[bd.perm]

    def apply(x):
        x = np.ravel(x)
        return sla.cho_solve_banded((factor, False), x, check_finite=False) - w * (scale * float(w @ x))

    op = spla.LinearOperator((m, m), matvec=apply, dtype=float)
    values, vectors = spla.eigsh(op, k=1, which="LM", tol=LANCZOS_TOL, ncv=min(m - 1, LANCZOS_VECTORS), v0=start)
    vector = np.empty(m)
    vector[bd.perm] = vectors[:, 0]
    return shift + 1.0 / float(values[0]), vector


def sturm_counts(diag: np.ndarray, off: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Number of eigenvalues below ``x (n, K)`` of the symmetric tridiagonal matrices ``(diag (n, M), off (n, M-1))``.

    Sylvester's law of inertia on ``T - x I = L D L^T``: the count is the number of negative pivots
    ``q_i = d_i - x - off_{i-1}^2 / q_{i-1}``; a zero pivot is replaced by ``-pivmin`` (LAPACK ``dstebz``). In
    floating point the count is exact for a matrix within a few ulps of ``T`` entrywise (Kahan; Demmel 1997 §5.3).

    Where :func:`_compiled_size` says so for ``diag``, a compiled sweep
    (:func:`_sturm_sweep`, numba) does the same operations in the same order per ``(state, x)``: the same counts
    (tests/test_observers_cost.py); the numpy sweep below costs ~7 array calls per pivot (257 pivots: 4 ms per
    check on lqr_1d, 121 states x 19 shifts).
    """
    off2 = off * off
    pivmin = np.finfo(float).tiny * max(1.0, float(off2.max(initial=0.0)))
    x = np.asarray(x, dtype=float)
    sweep = compiled(_sturm_sweep, STURM_SIGNATURE) if _compiled_size(diag.size) and diag.shape[1] > 1 else None
    if sweep is not None:
        count = np.empty(x.shape, dtype=np.int64)
        sweep(np.ascontiguousarray(diag, dtype=float), np.ascontiguousarray(off2), np.ascontiguousarray(x),
              float(pivmin), count)
        return count
    d_t = np.ascontiguousarray(diag.T)[:, :, None]  # (M, n, 1): one contiguous column per pivot
    o2_t = np.ascontiguousarray(off2.T)[:, :, None]
    q = d_t[0] - x
    count = (q < 0).astype(int)
    tmp, small = np.empty_like(q), np.empty(q.shape, bool)
    for i in range(1, diag.shape[1]):  # q = (d_i - x) - off_{i-1}^2 / q, in place
        np.less(np.abs(q, out=tmp), pivmin, out=small)
        np.copyto(q, -pivmin, where=small)
        np.divide(o2_t[i - 1], q, out=q)
        np.subtract(d_t[i], x, out=tmp)
        np.subtract(tmp, q, out=q)
        np.less(q, 0.0, out=small)
        count += small
    return count


STURM_SIGNATURE = "void(f8[:, ::1], f8[:, ::1], f8[:, ::1], f8, i8[:, ::1])"


def _sturm_sweep(diag, off2, x, pivmin, count):
    """Compiled :func:`sturm_counts`: for each state the ``K`` recurrences side by side (independent, branch-free:
    the divisions overlap), each ``q = (d_i - x) - off2_{i-1} / q`` with ``|q| < pivmin -> -pivmin`` first, as in the
    numpy sweep. ``diag (n, M)``, ``off2 (n, M - 1)``, ``x (n, K)``; ``count (n, K)`` out."""
    n, m = diag.shape
    k = x.shape[1]
    q = np.empty(k)
    counts = np.empty(k, np.int64)
    for s in range(n):
        for c in range(k):
            q[c] = diag[s, 0] - x[s, c]
            counts[c] = q[c] < 0.0
        for i in range(1, m):
            d, o = diag[s, i], off2[s, i - 1]
            for c in range(k):
                v = q[c]
                v = -pivmin if abs(v) < pivmin else v
                v = (d - x[s, c]) - o / v
                q[c] = v
                counts[c] += v < 0.0
        for c in range(k):
            count[s, c] = counts[c]


#: A 2D state whose matrix ``S`` is that of an already solved state of the same call under a mesh automorphism
#: (:func:`symmetries`) takes its gap minus the Gershgorin distance (Weyl) when that loses at most this fraction:
#: mirror states of a symmetric problem (LQR: ``Q(s, a) = Q(-s, -a)``) agree to round-off, and the distance is
#: 2e-12 to 7e-12 of ``ell`` on lqr_2d_action (the round-off of ``S``, not a change of the number).
SYMMETRY_LOSS = 1e-10


@dataclass(frozen=True)
class Symmetries:
    """Automorphisms of a mesh's edge graph from isometries of its bounding box (reflections, the point
    reflection and, on a square box, the rotations and diagonal reflections) that map the DOFs onto DOFs:
    ``nodes (K, M)``: node ``nodes[k, i]`` is the image of node ``i``; ``edges (K, E)``: the index of the image of
    edge ``e`` (either orientation). ``K = 0`` for none."""

    nodes: np.ndarray
    edges: np.ndarray


def symmetries(space: ActionSpace) -> Symmetries:
    """The :class:`Symmetries` of ``space`` (2D meshes; computed once per action space object)."""
    entry = _SYMMETRIES.get(id(space))
    if entry is not None and entry[0] is space:
        return entry[1]
    a = np.asarray(space.coords, float)
    m = space.n_dofs
    nodes, edge_maps = [], []
    if space.dim == 2 and m > 1:
        lo, hi = a.min(axis=0), a.max(axis=0)
        centre, size = 0.5 * (lo + hi), float(np.max(hi - lo))
        x = a - centre
        maps = [x * [-1.0, 1.0], x * [1.0, -1.0], -x]
        if abs((hi - lo)[0] - (hi - lo)[1]) <= 1e-9 * size:  # a square: the rest of the dihedral group
            maps += [x[:, ::-1], -x[:, ::-1], x[:, ::-1] * [-1.0, 1.0], x[:, ::-1] * [1.0, -1.0]]
        quantum = 1e-7 * size  # nodes are identified to 1e-7 of the box (mesh coordinates carry round-off)
        index = {tuple(k): i for i, k in enumerate(np.round(x / quantum).astype(np.int64).tolist())}
        j, k = space.edges[:, 0], space.edges[:, 1]
        lo_e, hi_e = np.minimum(j, k), np.maximum(j, k)
        edge_index = {key: e for e, key in enumerate(zip(lo_e.tolist(), hi_e.tolist()))}
        for image in maps:
            p = np.array([index.get(tuple(q), -1) for q in np.round(image / quantum).astype(np.int64).tolist()])
            if np.any(p < 0) or np.unique(p).size != m or np.array_equal(p, np.arange(m)):
                continue
            pj, pk = p[j], p[k]
            pe = np.array([edge_index.get(key, -1) for key in zip(np.minimum(pj, pk).tolist(),
                                                                 np.maximum(pj, pk).tolist())])
            if np.all(pe >= 0) and np.unique(pe).size == pe.size:
                nodes.append(p)
                edge_maps.append(pe)
    result = Symmetries(nodes=np.array(nodes, dtype=np.int64).reshape(-1, m),
                        edges=np.array(edge_maps, dtype=np.int64).reshape(-1, space.edges.shape[0]))
    _SYMMETRIES[id(space)] = (space, result)
    return result


_SYMMETRIES: dict[int, tuple[ActionSpace, Symmetries]] = {}


def _gershgorin(space: ActionSpace, diag_difference: np.ndarray, off_difference: np.ndarray) -> np.ndarray:
    """The largest absolute row sum of the difference of two symmetric matrices on the edge graph of ``space``
    (``diag_difference (..., M)``, ``off_difference (..., E)``), a bound of its 2-norm: the Weyl distance of
    :func:`gap_lower_bounds`, per state."""
    inc_j, inc_k = space.incidences
    d_off = np.abs(off_difference)
    return (np.abs(diag_difference) + d_off @ inc_j + d_off @ inc_k).max(axis=-1)


def _mirror_partners(space: ActionSpace, diag: np.ndarray, off: np.ndarray,
                     todo: np.ndarray) -> list[tuple[int, int, np.ndarray, float]]:
    """``(s, t, nodes, distance)`` for states ``s`` of ``todo`` whose ``S_s`` is close to ``P S_t P^T`` for another
    state ``t`` of ``todo`` (the first of its group) and an automorphism ``P`` (:func:`symmetries`; ``nodes`` its node
    map): ``distance`` the Gershgorin bound of ``||S_s - P S_t P^T||_2`` for the automorphism whose diagonal is
    closest.
    Candidates are the states with equal permutation-invariant sums of ``diag`` and ``|off|`` (to 1e-9)."""
    sym = symmetries(space)
    if not sym.nodes.shape[0] or todo.size < 2:
        return []
    keys = np.stack([diag[todo].sum(axis=1), np.abs(off[todo]).sum(axis=1)], axis=1)
    order = todo[np.lexsort((keys[:, 1], keys[:, 0]))]
    key = dict(zip(todo.tolist(), keys.tolist()))
    pairs, head = [], int(order[0])
    for s in (int(i) for i in order[1:]):
        ks, kt = key[s], key[head]
        if not all(abs(x - y) <= 1e-9 * max(abs(x), abs(y)) for x, y in zip(ks, kt)):
            head = s  # a new group
            continue
        on_diag = diag[s][None, :] - diag[head][sym.nodes]  # (K, M)
        best = int(np.argmin(np.abs(on_diag).max(axis=1)))  # the automorphism that matches the diagonals
        distance = _gershgorin(space, on_diag[best], off[s] - off[head][sym.edges[best]])
        pairs.append((s, head, sym.nodes[best], float(distance)))
    return pairs


def gap_lower_bounds(space: ActionSpace, g: np.ndarray, tau: float, scheme: str = "sg",
                     previous: np.ndarray | None = None, vectors: np.ndarray | None = None,
                     reference: tuple | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Certified lower bounds of the generator gaps ``ell_s`` of the potentials ``g (n, M)``.

    * 1D chain with ``previous (n,)`` (the gaps of the last check): vectorised Sturm sweeps (:func:`sturm_counts`)
      at ``previous * STURM_GRID``; the largest grid point with at most one eigenvalue below it (the zero
      eigenvalue) is a lower bound of ``ell`` (within 0.05% of it when ``ell`` moved by less than that). The
      three middle points go first (:data:`STURM_FIRST`), the whole grid only where they do not decide. States
      the grid does not bracket (``ell`` moved by more than -20% / +25%) are recomputed.
    * 2D with ``reference = (diag, off, ell)`` (the symmetrised matrices at which the lower bounds ``ell`` were
      computed): Weyl's inequality ``lambda_2(S) >= lambda_2(S_ref) - ||S - S_ref||_2`` with the Gershgorin bound of
      ``||S - S_ref||_2`` (largest absolute row sum); accepted when it loses at most :data:`WEYL_LOSS`, else
      recomputed (so near the optimum, where ``Q`` barely moves, no eigen-solve is needed).
    * 2D, among the states to recompute: a state whose ``S`` is the mirror image ``P S_t P^T`` of another one's
      under a mesh automorphism (:func:`symmetries`, :func:`_mirror_partners`; the mirror states of a symmetric
      problem) takes ``ell_t - ||S - P S_t P^T||`` (Weyl, Gershgorin) when that loses at most
      :data:`SYMMETRY_LOSS` (round-off), and ``P`` applied to ``t``'s eigenvector: half the eigen-solves on LQR.
    * Otherwise: ``(1 - GAP_SAFETY)`` times the eigensolver's gap: LAPACK bisection on the tridiagonal matrix
      (1D); on 2D meshes :func:`deflated_gap` (one banded Cholesky in reverse Cuthill-McKee order, Lanczos for the
      one eigenvalue of the rank-one deflated ``S + c sqrt(pi) sqrt(pi)^T``, a lower bound of ``ell`` by
      interlacing; started from ``vectors[s]``, the previous eigenvector, if given; 1.4 ms per state at 1201 DOFs
      against 4 ms for SuperLU shift-invert with two eigenvalues, the same value to 3e-15), SuperLU shift-invert
      just below 0 where the band is too wide or the factorisation fails, dense LAPACK for tiny meshes. The
      eigen-solves run on one BLAS thread (:func:`solver.parallel.single_threaded_blas`).

    Returns:
        ``(ell_lo (n,), eigenvectors (n, M) of S for 2D meshes or None, recomputed (n,) bool)``; ``recomputed``:
        the states whose gap was eigen-solved.
    """
    return _gap_bounds(space, g, tau, scheme, previous, vectors, reference)[:3]


def _gap_bounds(space: ActionSpace, g: np.ndarray, tau: float, scheme: str, previous: np.ndarray | None,
                vectors: np.ndarray | None, reference: tuple | None, share=None, rates=None) -> tuple:
    """:func:`gap_lower_bounds`, the symmetrised ``(diag, off)`` of ``g`` (the Weyl reference of a first call) and
    ``log pi_* (n,)`` (:func:`log_min_masses`, the same values).

    ``share``: a :class:`solver.parallel.Partition` of several ranks, every rank calling with the same arguments
    (all states): the eigen-solves are dealt out over the ranks (rank ``r`` solves every ``K``-th) and their values
    and eigenvectors summed over the ranks (``Allreduce``), so that each rank returns the serial result while
    solving ``1/K`` of the states (mirror pairs across the ranks' blocks of states included). ``rates``: the edge
    rates of ``g`` if the caller has them (:func:`_symmetrised`)."""
    diag, off, log_pi = _symmetrised(space, g, tau, scheme, rates)
    n, m = diag.shape
    out = np.full(n, np.nan)
    chain = space.is_chain
    j, k = space.edges[:, 0], space.edges[:, 1]
    if chain and previous is not None:
        out = _sturm_gaps(diag, off, np.asarray(previous, float))
    elif not chain and reference is not None:
        d_ref, o_ref, ell_ref = reference
        weyl = ell_ref - _gershgorin(space, diag - d_ref, off - o_ref)
        accept = np.isfinite(weyl) & (weyl >= (1.0 - WEYL_LOSS) * ell_ref)
        out[accept] = weyl[accept]
    todo = np.flatnonzero(~np.isfinite(out))
    new_vectors = None if chain else (np.zeros((n, m)) if vectors is None else vectors.copy())
    bd = band(space) if not chain and m > 64 and todo.size else None
    banded = bd is not None and bd.width ** 2 * m <= BAND_WORK
    ab = np.zeros((bd.width + 1, m)) if banded else None  # the band pattern is the same for every state
    pairs = [] if chain else _mirror_partners(space, diag, off, todo)
    mirrored = {s for s, *_ in pairs}
    solved = [s for s in todo if s not in mirrored]
    heads = solved if share is None else solved[share.rank::share.size]  # this rank's share of the solves
    with single_threaded_blas():  # small band and LAPACK calls: two BLAS threads only add synchronisation
        for s, t, nodes, distance in [(s, None, None, None) for s in heads] + [(None,) * 4] + pairs:
            if s is None:  # the solves dealt out are done: every rank gets all of them
                if share is not None and solved:
                    _share_solves(share, solved, out, new_vectors)
                continue
            if t is not None:  # Weyl against the mirror image of a state solved above
                weyl = out[t] - distance
                if np.isfinite(weyl) and distance <= SYMMETRY_LOSS * out[t]:
                    out[s], new_vectors[s] = weyl, new_vectors[t][nodes]
                    continue
                solved.append(s)  # (every rank solves it: the same pairs on every rank)
            if chain:
                value = sla.eigh_tridiagonal(diag[s], off[s], select="i", select_range=(1, 1), eigvals_only=True)[0]
            elif m <= 64:
                S = np.diag(diag[s])
                S[j, k] = S[k, j] = off[s]
                values, vecs = sla.eigh(S, subset_by_index=(1, 1))
                value, new_vectors[s] = values[0], vecs[:, 0]
            else:
                v0 = vectors[s] if vectors is not None and np.any(vectors[s]) else None
                found = deflated_gap(bd, diag[s], off[s], log_pi[s], v0, ab) if banded else None
                if found is None:
                    found = _superlu_gap(diag[s], off[s], j, k, v0)
                value, new_vectors[s] = found
            out[s] = (1.0 - GAP_SAFETY) * value
    recomputed = np.zeros(n, bool)
    recomputed[np.array(solved, dtype=np.int64)] = True
    if reference is not None and not chain:  # keep the reference of the accepted states, update the others
        d_ref, o_ref, ell_ref = reference
        d_ref[todo], o_ref[todo], ell_ref[todo] = diag[todo], off[todo], out[todo]
    return out, new_vectors, recomputed, diag, off, log_pi.min(axis=1)


def _sturm_gaps(diag: np.ndarray, off: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The warm 1D certificate of :func:`gap_lower_bounds`: per chain, the largest point of ``previous *
    STURM_GRID`` with at most one eigenvalue below it (NaN where the grid does not bracket ``ell``), the three
    points :data:`STURM_FIRST` first and then only the grid points above or below them."""
    out = np.full(diag.shape[0], np.nan)
    x = previous[:, None] * STURM_GRID[None, :]
    finite = np.all(np.isfinite(x), axis=1)
    # the three middle points first; then, where they do not decide, the grid points above or below them
    lo, mid, hi = STURM_FIRST
    first = sturm_counts(diag, off, x[:, STURM_FIRST]) <= 1  # no non-zero eigenvalue below x: ell >= x
    decided = first[:, 0] & ~first[:, 2] & finite
    out[decided] = np.where(first[decided, 1], x[decided, mid], x[decided, lo])
    for rest, points in ((first[:, 2] & finite, np.arange(hi + 1, STURM_GRID.size)),
                         (~first[:, 0] & ~first[:, 2] & finite, np.arange(lo))):
        rest = np.flatnonzero(rest)
        if not rest.size:
            continue
        ok = sturm_counts(diag[rest], off[rest], x[np.ix_(rest, points)]) <= 1
        found = ok.any(axis=1)
        top = points[-1] - np.argmax(ok[:, ::-1], axis=1)  # the largest point with ok, where found
        if points[0] > hi:  # ell >= x_hi: x_hi if none above it; all of them: ell moved by more than +25%
            top, inside = np.where(found, top, hi), ~ok[:, -1]
        else:  # ell < x_lo: none below it means it moved by more than -20%
            inside = found
        out[rest[inside]] = x[rest[inside], top[inside]]
    return out


def _share_solves(share, solved: list[int], out: np.ndarray, vectors: np.ndarray | None) -> None:
    """``out[solved]`` and ``vectors[solved]`` summed over the ranks, each rank having solved every ``K``-th (the
    others' entries taken as 0): one ``Allreduce`` of the gaps and one of the eigenvectors."""
    idx = np.asarray(solved, dtype=np.int64)
    mine = np.zeros(idx.size, bool)
    mine[share.rank::share.size] = True
    out[idx] = share.reduce(np.where(mine, out[idx], 0.0))
    if vectors is not None:
        vectors[idx] = share.reduce(np.where(mine[:, None], vectors[idx], 0.0))


def _superlu_gap(diag: np.ndarray, off: np.ndarray, j: np.ndarray, k: np.ndarray,
                 v0: np.ndarray | None) -> tuple[float, np.ndarray]:
    """``ell`` and its eigenvector by ARPACK shift-invert just below 0 on the sparse ``S`` (SuperLU): the two
    eigenvalues nearest the shift are 0 and ``ell``."""
    m = diag.size
    S = sp.coo_matrix((np.concatenate([diag, off, off]), (np.concatenate([np.arange(m), j, k]),
                                                          np.concatenate([np.arange(m), k, j]))), shape=(m, m)).tocsc()
    shift = -1e-3 * float(np.mean(diag))
    values, vecs = spla.eigsh(S, k=2, sigma=shift, which="LM", tol=1e-10, ncv=8, v0=v0)
    top = int(np.argmax(values))
    return float(values[top]), vecs[:, top]


class GapTracker:
    """Certified lower bounds of the generator gaps along a flow (:func:`gap_lower_bounds`, warm-started from
    the previous call: its gaps in 1D; in 2D its eigenvectors and, while ``N (M + E)`` doubles fit in
    :data:`REFERENCE_BYTES`, the reference matrices of Weyl's inequality; the mirror states of a call share one
    eigen-solve, :func:`symmetries`).

    ``share``: the MPI partition of the states. On a 2D mesh under several ranks the tracker is *shared*
    (:attr:`shared`): every rank calls it with the potentials of all states, the eigen-solves are dealt out over
    the ranks (:func:`_gap_bounds`), and its gaps, eigenvectors and Weyl reference are those of all states on every
    rank (the serial ones), so that the mirror partners of a symmetric problem, which lie in other ranks' blocks of
    states, still share one solve. Otherwise each rank tracks its own states."""

    def __init__(self, space: ActionSpace, tau: float, scheme: str = "sg", share=None):
        self.space, self.tau, self.scheme = space, tau, scheme
        self.share = share if share is not None and not share.serial and not space.is_chain else None
        self.previous = self.vectors = None
        self.reference = None  # 2D: (diag (N, M), off (N, E), ell (N,)) at which ell was computed
        self.recomputed = 0  # eigen-solves done by the last call
        self.log_pi_min = None  # log pi_* (N,) of the last call's potentials (log_min_masses)

    @property
    def shared(self) -> bool:
        """Whether the ranks share the tracker (all states on every rank, the solves dealt out)."""
        return self.share is not None

    def __call__(self, g: np.ndarray, rates: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """``ell_lo (N,)`` for the potentials ``g (N, M)`` (in chunks of states; collective when :attr:`shared`).
        ``rates``: the flow's edge rates ``(fwd, bwd)`` of ``g`` if at hand (:func:`_symmetrised`)."""
        n = g.shape[0]
        space = self.space
        keep = not space.is_chain and 16 * n * (space.n_dofs + space.edges.shape[0]) <= REFERENCE_BYTES
        parts = budget.chunks(n, 64 * (space.edges.shape[0] + space.n_dofs))
        ell, vectors, references, recomputed, log_pi_min = [], [], [], 0, []
        for part in parts:
            prev = None if self.previous is None else self.previous[part]
            vec = None if self.vectors is None else self.vectors[part]
            ref = None if not keep or self.reference is None else tuple(r[part].copy() for r in self.reference)
            part_rates = None if rates is None else (rates[0][part], rates[1][part])
            e, v, done, diag, off, low = _gap_bounds(space, g[part], self.tau, self.scheme, prev, vec, ref, self.share,
                                                     part_rates)
            log_pi_min.append(low)
            if keep and ref is None:  # every state was computed: its matrices are the reference
                ref = (diag, off, e.copy())
            references.append(ref)
            ell.append(e)
            vectors.append(v)
            recomputed += int(done.sum())
        self.reference = tuple(np.concatenate(r) for r in zip(*references)) if keep else None
        self.previous = np.concatenate(ell)
        self.vectors = None if vectors[0] is None else np.concatenate(vectors)
        self.recomputed = recomputed
        self.log_pi_min = np.concatenate(log_pi_min)
        return self.previous
