"""The Wasserstein policy-gradient flow (math.md §3) and its time loop.

For every state ``s``, with ``Q = Q^{pi_t}`` re-evaluated from the current policy at all states,

    d_t p = div( tau grad p + p grad(tau U - Q) )      in A,     no flux on the boundary of A,

equivalently ``d_t p = tau div( G grad(p / G) )`` with ``G ∝ mu exp(Q / tau) = exp(g)``, ``g = Q/tau - U``.

**Space: edge-averaged P1 finite elements** (Xu-Zikatanov EAFE; the Scharfetter-Gummel scheme in 1D).
With ``u = p / exp(g)``, the flux from DOF ``j`` to ``k`` along a mesh edge is

    F_jk = tau omega_jk c_jk (u_j - u_k) = tau omega_jk ( B(-dg) p_j - B(dg) p_k ),   dg = g_k - g_j,

where ``omega_jk = -K_jk`` comes from the P1 stiffness matrix, ``B(x) = x / (e^x - 1)`` and ``c_jk`` is the
harmonic mean of ``e^g`` along the edge ("sg"), or ``c_jk = exp((g_j + g_k) / 2)`` with
``tau omega (e^{-dg/2} p_j - e^{dg/2} p_k)`` ("sqra"). Lumped masses ``m_j = w_j p_j`` evolve by
``dm/dt = L m`` with ``L`` an M-matrix whose columns sum to zero and which is in detailed balance with
the discrete Gibbs masses ``w_j G_j``.

**Time: implicit Euler with Q frozen over the step**, ``(I - dt L_n) m^{n+1} = m^n``. For every ``dt``:
mass is conserved (``1^T (I - dt L) = 1^T``), ``m^{n+1} >= 0`` (inverse M-matrix), the discrete Gibbs
policy of ``Q*`` is an exact fixed point (all fluxes vanish at ``u = const``), and ``V^{pi_n}`` is
non-decreasing at every state (the step is a Markov kernel with invariant ``G_n``; math.md §3).

The per-state systems are assembled into one block-diagonal banded matrix and solved by one LAPACK
banded solve (``gbsv``; no pivoting occurs since ``I - dt L`` is column diagonally dominant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from . import bellman
from .fem import ActionSpace
from .mdp import MDP

SCHEMES = ("sg", "sqra")


def bernoulli(x: np.ndarray) -> np.ndarray:
    """``B(x) = x / (e^x - 1)`` with ``B(0) = 1``, without overflow for large ``|x|``."""
    with np.errstate(over="ignore", invalid="ignore"):  # x / inf = 0 for x > 709; 0 / 0 patched below
        out = x / np.expm1(x)
    out[x == 0] = 1.0
    return out


def potential(mdp: MDP, Q: np.ndarray) -> np.ndarray:
    """``g = Q / tau + log mu`` (the log of the unnormalised Gibbs density), ``(N, M)``."""
    return Q / mdp.tau + mdp.log_mu


def edge_rates(space: ActionSpace, g: np.ndarray, tau: float, scheme: str = "sg") -> tuple[np.ndarray, np.ndarray]:
    """Flux coefficients per unit density: ``F_jk = fwd * p_j - bwd * p_k`` for each edge ``(j, k)``.

    Args:
        space: the action space (edges and conductances).
        g: ``(N, M)`` log Gibbs density (any per-state constant may be added).
        tau: temperature.
        scheme: "sg" (Scharfetter-Gummel / harmonic edge average) or "sqra" (geometric average).

    Returns:
        ``(fwd, bwd)``, each ``(N, E)`` and ``>= 0``, with ``fwd / bwd = exp(dg)`` (detailed balance).
    """
    j, k = space.edges[:, 0], space.edges[:, 1]
    dg = g[:, k] - g[:, j]
    scale = tau * space.conductance
    if scheme == "sg":
        return scale * bernoulli(-dg), scale * bernoulli(dg)
    if scheme == "sqra":
        return scale * np.exp(0.5 * dg), scale * np.exp(-0.5 * dg)
    raise ValueError(f"unknown scheme {scheme!r} (allowed: {', '.join(SCHEMES)})")


def generator(space: ActionSpace, g: np.ndarray, tau: float, scheme: str = "sg") -> sp.csr_matrix:
    """The generator ``L`` on masses for one state (``g`` of shape ``(M,)``): ``dm/dt = L m``."""
    fwd, bwd = edge_rates(space, g[None, :], tau, scheme)
    j, k = space.edges[:, 0], space.edges[:, 1]
    w = space.weights
    out_j, out_k = fwd[0] / w[j], bwd[0] / w[k]  # rate per unit mass leaving j towards k, and k towards j
    M = space.n_dofs
    L = sp.coo_matrix((np.concatenate([out_j, out_k]), (np.concatenate([k, j]), np.concatenate([j, k]))),
                      shape=(M, M)).tocsr()
    return L - sp.diags(np.asarray(L.sum(axis=0)).ravel())


def implicit_step(space: ActionSpace, masses: np.ndarray, g: np.ndarray, tau: float, dt: float,
                  scheme: str = "sg") -> np.ndarray:
    """One implicit Euler step ``m^{n+1} = (I - dt L)^{-1} m^n`` for all states at once.

    Args:
        masses: ``(N, M)`` masses ``m_ij = w_j p_ij`` at ``t_n``.
        g: ``(N, M)`` log Gibbs density built from ``Q^{pi_n}`` (frozen over the step).

    Returns:
        ``(N, M)`` masses at ``t_n + dt``.
    """
    n, m = masses.shape
    bw = space.bandwidth
    j, k = space.edges[:, 0], space.edges[:, 1]
    fwd, bwd = edge_rates(space, g, tau, scheme)
    w = space.weights
    out_j = dt * fwd / w[j]  # (N, E): rate of mass leaving j towards k, times dt
    out_k = dt * bwd / w[k]
    ab = np.zeros((2 * bw + 1, n, m))
    if space.is_chain:  # 1D: edges (0, 1), (1, 2), ...; plain slices instead of scatters
        ab[bw] = 1.0
        ab[bw, :, :-1] += out_j
        ab[bw, :, 1:] += out_k
        ab[bw + 1, :, :-1] = -out_j  # A[j + 1, j]
        ab[bw - 1, :, 1:] = -out_k  # A[j, j + 1]
    else:
        ab[bw] = 1.0 + out_j @ incidence(j, m) + out_k @ incidence(k, m)  # 1 + column sums of -dt L
        ab[bw + (k - j), :, j] = -out_j.T  # A[k, j]
        ab[bw + (j - k), :, k] = -out_k.T  # A[j, k]
    new = sla.solve_banded((bw, bw), ab.reshape(2 * bw + 1, n * m), masses.ravel(), overwrite_ab=True,
                           check_finite=False)
    return new.reshape(n, m)


def incidence(nodes: np.ndarray, m: int) -> sp.csr_matrix:
    """``(E, M)`` 0/1 matrix with a one at ``(e, nodes[e])``: ``x @ S`` sums edge values into nodes."""
    return sp.csr_matrix((np.ones(nodes.size), (np.arange(nodes.size), nodes)), shape=(nodes.size, m))


def dissipation(mdp: MDP, p: np.ndarray, g: np.ndarray, scheme: str = "sg") -> np.ndarray:
    """Discrete statewise dissipation ``D^h(s) = sum_edges F_jk (phi_k - phi_j) >= 0`` (math.md §4).

    ``phi = Q - tau log(p / mu) = tau (g - log p)``, so ``D^h = tau^2 sum omega c (u_j - u_k) log(u_j/u_k)``.
    Exact for the semi-discrete ODE: ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D^h``. Densities that underflowed
    to zero are floored at the smallest normal double inside the logarithm.
    """
    fwd, bwd = edge_rates(mdp.space, g, mdp.tau, scheme)
    j, k = mdp.space.edges[:, 0], mdp.space.edges[:, 1]
    flux = fwd * p[:, j] - bwd * p[:, k]
    logp = np.log(np.maximum(p, np.finfo(float).tiny))
    phi = mdp.tau * (g - logp)
    return np.sum(flux * (phi[:, k] - phi[:, j]), axis=1)


@dataclass
class FlowState:
    """One point of the flow: ``p`` at time ``t``, reached by a step of size ``dt`` (0 at the start).

    Attributes:
        step: step index (0 for the initial policy).
        t: time.
        dt: size of the step that produced this state.
        p: ``(N, M)`` policy density.
        evaluation: soft policy evaluation of ``p`` (``V``, ``Q`` and the LU for adjoint solves).
        g: ``(N, M)`` log Gibbs density of ``Q`` (the potential of the next step).
        rejected: steps rejected by the adaptive controller before this one was accepted.
    """

    step: int
    t: float
    dt: float
    p: np.ndarray
    evaluation: bellman.Evaluation
    g: np.ndarray
    rejected: int = 0


class NumericalError(RuntimeError):
    """A flow produced non-finite values."""


@dataclass(frozen=True)
class Adaptive:
    """Step-size control for implicit Euler.

    The local error is estimated from successive mass increments,
    ``err = max_s 1/2 || dm^n - (dt_n / dt_{n-1}) dm^{n-1} ||_1`` (``~ dt^2 |m''|``, a total-variation
    distance). A step with ``err > tol`` is redone with a smaller ``dt``; after an accepted step
    ``dt <- dt * clip(0.9 sqrt(tol / err), 0.5, 2)``, capped at ``dt_max``. Since every step is monotone
    and positive, the controller is about accuracy only.
    """

    tol: float = 1e-3
    dt_max: float = math.inf


def wasserstein_flow(mdp: MDP, p0: np.ndarray, dt: float, scheme: str = "sg", adaptive: Adaptive | None = None,
                     t_end: float = math.inf) -> Iterator[FlowState]:
    """Yield the implicit-Euler WPG flow ``p^0, p^1, ...`` from ``p0`` (forever, or until ``t_end``).

    The generator only steps; recording, progress and stopping rules belong to its consumer.

    Raises:
        NumericalError: if a step produces non-finite values.
    """
    space = mdp.space
    p = p0
    t, n = 0.0, 0
    ev = _evaluate_checked(mdp, p, n, t)
    g = potential(mdp, ev.Q)
    yield FlowState(step=0, t=0.0, dt=0.0, p=p, evaluation=ev, g=g)
    masses = p * space.weights
    previous_increment, previous_dt = None, None
    while t < t_end * (1 - 1e-12):
        rejected = 0
        while True:
            # fixed steps land on t = n dt exactly, without accumulating round-off in t
            t_new = min(t + dt if adaptive is not None else (n + 1) * dt, t_end)
            h = t_new - t
            new_masses = implicit_step(space, masses, g, mdp.tau, h, scheme)
            if adaptive is None:
                break
            increment = new_masses - masses
            if previous_increment is None:
                break
            err = 0.5 * np.max(np.sum(np.abs(increment - (h / previous_dt) * previous_increment), axis=1))
            factor = 0.9 * math.sqrt(adaptive.tol / err) if err > 0 else 2.0
            if err <= adaptive.tol or h <= 1e-12 * max(1.0, t):
                dt = min(adaptive.dt_max, h * min(2.0, max(0.5, factor)))
                break
            dt = h * max(0.2, factor)
            rejected += 1
        if adaptive is not None:
            previous_increment, previous_dt = increment, h
        masses = new_masses
        p = masses / space.weights
        t = t_new
        n += 1
        ev = _evaluate_checked(mdp, p, n, t)
        g = potential(mdp, ev.Q)
        yield FlowState(step=n, t=t, dt=h, p=p, evaluation=ev, g=g, rejected=rejected)


def _evaluate_checked(mdp: MDP, p: np.ndarray, step: int, t: float) -> bellman.Evaluation:
    """Policy evaluation, refusing non-finite policies, values or a singular Bellman system."""
    where = f"at step {step} (t = {t:.6g})"
    if not np.all(np.isfinite(p)):
        raise NumericalError(f"non-finite values in the policy {where}")
    try:
        ev = bellman.evaluate(mdp, p)
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:  # singular or non-finite I - gamma P^pi
        raise NumericalError(f"policy evaluation failed {where}: {exc}") from None
    if not (np.all(np.isfinite(ev.V)) and np.all(np.isfinite(ev.Q))):
        raise NumericalError(f"non-finite values in V or Q {where}")
    return ev
