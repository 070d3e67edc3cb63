"""Soft policy evaluation and soft Bellman optimality on the discretised MDP (theory.md §2).

Policies are densities w.r.t. Lebesgue measure at the action DOFs, ``p: (N, M)`` with
``sum_j w_j p_ij = 1``; their masses are ``m_ij = w_j p_ij``. Convention ``0 log 0 = 0``.

* :func:`evaluate`: ``(I - gamma P^pi) V = r^pi`` (one sparse LU), ``Q = R + gamma T V``.
* :func:`gibbs`: ``G_ij = mu_j exp(Q_ij / tau) / Z_i`` by log-sum-exp (no overflow for small ``tau``).
* :func:`soft_bellman`: ``(T V)_i = tau log sum_j w_j mu_j exp((R_ij + gamma (T V)_ij) / tau)``.
* :func:`soft_policy_iteration`: ``p <- G^{pi}`` until ``V`` stops moving (Newton's method for
  ``V = T V``; monotone, converges quadratically near ``pi*``).

Exact discrete identities, used as tests: ``T V^pi - V^pi = tau KL(p || G^pi)`` per state, and the soft
performance-difference lemma.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from . import budget
from .mdp import MDP
from .parallel import single_threaded_blas


@dataclass
class Evaluation:
    """Soft policy evaluation of one policy.

    Attributes:
        V: ``(N,)`` soft value ``V^pi``.
        Q: ``(N, M)`` soft state-action value ``Q^pi``; None under MPI until gathered
            (:meth:`solver.flows.FlowState.gather`).
        resolvent: solver of ``I - gamma P^pi`` (:class:`Resolvent`), reused for the adjoint (occupancy) solves.
        log_p: ``(N, M)`` ``log max(p, tiny)`` of the evaluated policy (``tiny`` the smallest normal double),
            computed once for the entropy of ``r^pi`` and kept for the consumers of the same policy (the
            dissipation of the step) while it is at most :data:`solver.budget.KL_CHUNK_BYTES`; None otherwise
            (they recompute it). Under MPI it holds this rank's rows only (``partition.rows``).
    """

    V: np.ndarray
    Q: np.ndarray | None
    resolvent: "Resolvent"
    log_p: np.ndarray | None = None
    own_Q: np.ndarray | None = None  # this rank's rows of Q (MPI; serially Q itself)

    def __post_init__(self):
        self.own_Q = self.Q if self.own_Q is None else self.own_Q

    def resolvent_adjoint(self, rho: np.ndarray) -> np.ndarray:
        """``x = (I - gamma P^pi)^{-T} rho``, so that ``rho^T (I - gamma P^pi)^{-1} D = x . D``.

        ``(1 - gamma) x`` is the discounted occupancy ``d^pi_rho`` (theory.md §2).
        """
        return self.resolvent.solve(rho, trans="T")


#: Below this many states ``I - gamma P^pi`` is factorised densely (LAPACK beats SuperLU's overhead).
DENSE_STATES = 1500

#: Above :data:`DENSE_STATES`, SuperLU is used while ``bandwidth^2 <= SPARSE_RATIO * nnz / N`` for ``P^pi``: the
#: banded LU costs ``~N bandwidth^2`` flops, GMRES ``~2 nnz`` per iteration and a few dozen iterations. 1D state
#: grids (bandwidth ~ nnz / 2N) take SuperLU; 2D grids, whose bandwidth is a multiple of a grid row, take GMRES.
SPARSE_RATIO = 256

#: GMRES stops when ``||b - (I - gamma P) x|| <= KRYLOV_RTOL ||b||``. ``cond(I - gamma P) <= (1 + gamma) /
#: (1 - gamma)`` in the infinity norm, so with gamma <= 0.99 the relative error of ``V`` is at most ~2e-12: below
#: the flow's monotonicity tolerance (``experiment.MONOTONE_TOLERANCE`` = 1e-12 of |J| per step is far larger
#: than J's step-to-step round-off in practice, tested in tests/test_bellman.py).
KRYLOV_RTOL = 1e-14


class Resolvent:
    """``x = (I - gamma P^pi)^{-1} b`` (``trans="N"``) or ``(I - gamma P^pi)^{-T} b`` (``trans="T"``).

    Methods (``method="auto"`` picks by size):

    * "dense": LAPACK LU, for ``N <= DENSE_STATES``;
    * "sparse": SuperLU, while ``bandwidth(P)^2 <= SPARSE_RATIO nnz(P) / N`` (1D state grids: ``P^pi`` is banded);
    * "krylov": restarted GMRES on the CSR ``P^pi`` (2D state grids, whose LU would fill in). ``I - gamma P``
      is an M-matrix whose spectrum lies in the disk ``|z - 1| <= gamma``; a smoothing kernel has few eigenvalues
      near that disk's rim, so GMRES needs a few dozen matrix-vector products (``benchmarks/bench_memory.py``).
      Memory: ``P^pi`` only (12 bytes per non-zero) and ``restart + 2`` vectors of ``N``.

    ``P`` is a sparse matrix or a dense ``(N, N)`` array (the interpolated ``P^pi`` of
    :class:`solver.mdp.InterpolatedPolicy`, factorised in place of a copy; converted to CSR for "sparse"/"krylov").

    Raises:
        ConvergenceError: (from :meth:`solve`) if GMRES does not reach :data:`KRYLOV_RTOL`.
    """

    METHODS = ("auto", "dense", "sparse", "krylov")

    def __init__(self, P: sp.csr_matrix | np.ndarray, gamma: float, method: str = "auto"):
        n = P.shape[0]
        if isinstance(P, np.ndarray):  # a dense P^pi (solver.mdp.InterpolatedPolicy): no sparse round trip
            if method == "dense" or (method == "auto" and n <= DENSE_STATES):
                self.method, self.gamma, self._P = "dense", gamma, None
                self._lu = _dense_lu(P, gamma)
                return
            P = sp.csr_matrix(P)
        if method == "auto":
            bandwidth = _bandwidth(P)
            banded = bandwidth ** 2 <= SPARSE_RATIO * P.nnz / n
            method = "dense" if n <= DENSE_STATES else "sparse" if banded else "krylov"
        self.method, self.gamma = method, gamma
        self._lu = self._P = None
        if method == "dense":
            self._lu = _dense_lu(P.toarray(), gamma)
        elif method == "sparse":
            self._lu = spla.splu(sp.identity(n, format="csc") - gamma * P.tocsc())
        else:
            self._P = P.tocsr()

    @classmethod
    def one_state(cls, p_stay: float, gamma: float) -> "Resolvent":
        """The ``1 x 1`` resolvent ``1 / (1 - gamma P)`` of a one-state MDP (``P = sum_j m_j``, 1 to round-off),
        without building a matrix (method "scalar"; the same numbers as a 1 x 1 LU)."""
        self = cls.__new__(cls)
        self.method, self.gamma, self._P = "scalar", gamma, None
        self._lu = np.array([1.0 - gamma * p_stay])
        return self

    def release(self) -> None:
        """Free the factorisation or ``P^pi`` (large for big state grids); :meth:`solve` then raises."""
        self._lu = self._P = None

    @property
    def released(self) -> bool:
        return self._lu is None and self._P is None

    def solve(self, b: np.ndarray, trans: str = "N") -> np.ndarray:
        if self.released:
            raise RuntimeError("this Resolvent was released (a flow frees it when it takes the next step)")
        if self.method == "scalar":
            return np.asarray(b, dtype=float) / self._lu
        if self.method == "dense":
            with single_threaded_blas(self._lu[0].shape[0]):
                return sla.lu_solve(self._lu, b, trans=0 if trans == "N" else 1, check_finite=False)
        if self.method == "sparse":
            return self._lu.solve(b, trans=trans)
        P = self._P if trans == "N" else self._P.T
        n, gamma = P.shape[0], self.gamma
        operator = spla.LinearOperator((n, n), matvec=lambda x: x - gamma * (P @ x), dtype=float)
        x, info = spla.gmres(operator, b, x0=b / (1.0 - gamma), **_gmres_rtol(KRYLOV_RTOL), atol=0.0,
                             restart=50, maxiter=100)
        if info != 0:
            raise ConvergenceError(f"GMRES for (I - gamma P^pi) x = b did not reach rtol {KRYLOV_RTOL} ({info})")
        return x


def _dense_lu(P: np.ndarray, gamma: float):
    """LAPACK's LU of ``I - gamma P`` (``P`` dense), on one BLAS thread for small ``N`` (10x faster,
    :data:`solver.parallel.SMALL_BLAS_ROWS`). The matrix is built in Fortran order, as LAPACK takes it: a C-ordered
    one is copied once more on the way in (measured at 241 states: 0.86 ms for the build and the LU against 1.6 ms;
    the same factors bit for bit)."""
    n = P.shape[0]
    A = np.empty((n, n), order="F")
    np.multiply(P, -gamma, out=A)
    A.ravel(order="K")[::n + 1] += 1.0  # the diagonal (a view: A is contiguous); 1 - gamma P_ii as before
    with single_threaded_blas(n):
        return sla.lu_factor(A, overwrite_a=True, check_finite=False)


def _gmres_rtol(rtol: float) -> dict:
    """GMRES's relative tolerance as a keyword: ``rtol`` from SciPy 1.12 on (``tol`` is gone in 1.14), else ``tol``."""
    import inspect

    return {"rtol" if "rtol" in inspect.signature(spla.gmres).parameters else "tol": rtol}


class DistributedResolvent:
    """``I - gamma P^pi`` distributed over the state partition (MPI), solved by restarted GMRES (PETSc KSP, no
    preconditioner, like the serial Krylov path) to :data:`KRYLOV_RTOL` on the true residual. Each rank keeps its
    own rows of ``P^pi`` (scipy CSR) behind a PETSc shell matrix (:class:`_ShellOperator`): a product gathers the
    ``N`` values of ``x`` (``Allgatherv``) and multiplies the own rows; a transposed product sums the ranks'
    ``P_own^T x_own`` (``Allreduce`` of ``N`` doubles). Nothing of ``P^pi`` is communicated, and nothing is
    assembled: an assembled MPIAIJ matrix cost more to build every step (~120 ms on 41 x 41 states, its
    off-rank scatter set up again) than its GMRES solve. Used by :func:`evaluate` under MPI where a serial run
    would take GMRES (2D state grids above :data:`DENSE_STATES` states), which every rank otherwise repeats on
    the whole gathered ``P^pi``. (MUMPS on the assembled 2D band, ~900 non-zeros per row, took 2.6x the
    replicated GMRES on 41 x 41 states and 2 ranks.)

    Solves are collective (every rank must call them), except the adjoint solve for ``rho``
    (:meth:`Evaluation.resolvent_adjoint`, used by rank 0's observers too): it is done once, collectively, at
    construction, and returned from then on by any rank alone.

    Args:
        P: this rank's rows of ``P^pi`` (``(rows, N)`` CSR).
        gamma: discount.
        partition: the :class:`solver.parallel.Partition` of the states.
        rho: the initial-state distribution ``(N,)`` whose adjoint solve is kept.
    """

    method = "petsc"

    def __init__(self, P: sp.csr_matrix, gamma: float, partition, rho: np.ndarray):
        from petsc4py import PETSc

        self._PETSc, self.partition, self.gamma = PETSc, partition, gamma
        n, rows = partition.n, partition.rows
        local = rows.stop - rows.start
        self._A = PETSc.Mat().createPython(((local, n), (local, n)), context=_ShellOperator(P, gamma, partition),
                                           comm=partition.comm)
        self._A.setUp()
        ksp = PETSc.KSP().create(partition.comm)
        ksp.setOperators(self._A)
        ksp.setType("gmres")  # as the serial Krylov path: restarted GMRES, no preconditioner, on the true residual
        ksp.setGMRESRestart(50)
        ksp.getPC().setType("none")
        ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
        ksp.setTolerances(rtol=KRYLOV_RTOL, atol=0.0, max_it=5000)
        ksp.setUp()
        self._ksp = ksp
        self._rho = np.array(rho, dtype=float)
        self._adjoint = self.partition.gather(self.solve_local(self._rho[partition.rows], "T"))

    def release(self) -> None:
        if self._ksp is not None:
            self._ksp.destroy()
            self._A.destroy()
        self._ksp = self._A = None

    @property
    def released(self) -> bool:
        return self._ksp is None

    def solve_local(self, b_local: np.ndarray, trans: str = "N") -> np.ndarray:
        """This rank's rows of the solution for this rank's rows ``b_local`` of the right-hand side."""
        if self.released:
            raise RuntimeError("this Resolvent was released (a flow frees it when it takes the next step)")
        b = self._A.createVecRight()
        b.setArray(np.ascontiguousarray(b_local, dtype=float))
        x = self._A.createVecLeft()
        (self._ksp.solve if trans == "N" else self._ksp.solveTranspose)(b, x)
        if self._ksp.getConvergedReason() < 0:
            raise ConvergenceError(f"PETSc KSP for (I - gamma P^pi) x = b failed ({self._ksp.getConvergedReason()})")
        out = x.getArray().copy()
        b.destroy()
        x.destroy()
        return out

    def solve(self, b: np.ndarray, trans: str = "N") -> np.ndarray:
        """``x`` for the full right-hand side ``b`` ``(N,)``, on every rank (collective but for ``rho``, "T")."""
        if trans != "N" and np.array_equal(b, self._rho):
            if self.released:
                raise RuntimeError("this Resolvent was released (a flow frees it when it takes the next step)")
            return self._adjoint.copy()
        return self.partition.gather(self.solve_local(np.asarray(b)[self.partition.rows], trans))


class _ShellOperator:
    """The petsc4py shell context of :class:`DistributedResolvent`: ``y = x - gamma P x`` and its transpose on
    this rank's rows ``P`` (``(rows, N)`` CSR) of ``P^pi``."""

    def __init__(self, P: sp.csr_matrix, gamma: float, partition):
        self.P, self.gamma, self.partition = P, gamma, partition

    def mult(self, mat, x, y) -> None:
        own = x.getArray(readonly=True)
        y.array[:] = own - self.gamma * (self.P @ self.partition.gather(own))

    def multTranspose(self, mat, x, y) -> None:
        own = x.getArray(readonly=True)
        y.array[:] = own - self.gamma * self.partition.reduce(self.P.T @ own)[self.partition.rows]


def _bandwidth(P: sp.csr_matrix) -> int:
    """``1 + max |i - k|`` over the non-zeros ``(i, k)`` of a CSR matrix, without an ``nnz``-sized temporary."""
    nonempty = np.flatnonzero(np.diff(P.indptr))
    if nonempty.size == 0:
        return 1
    starts = P.indptr[nonempty]
    low = np.minimum.reduceat(P.indices, starts)
    high = np.maximum.reduceat(P.indices, starts)
    return 1 + int(np.maximum(nonempty - low, high - nonempty).max())


def evaluate(mdp: MDP, p: np.ndarray, partition=None) -> Evaluation:
    """Soft policy evaluation: ``V^pi`` from ``(I - gamma P^pi) V = r^pi`` and ``Q^pi = R + gamma T V^pi``.

    With a :class:`solver.parallel.Partition` (MPI over states) ``p`` holds this rank's rows; each rank computes
    ``r^pi``, ``P^pi`` and ``Q`` on its own rows (``Q`` is left ungathered: :attr:`Evaluation.own_Q`, ``Q`` None)
    and gathers ``r^pi`` and ``P^pi``; the LU and the solve for ``V`` are replicated on every rank, except
    on 2D state grids above :data:`DENSE_STATES` states (GMRES when serial), where ``I - gamma P^pi`` is solved
    distributed (:class:`DistributedResolvent`, PETSc) and only ``V`` is gathered.
    Serial 1D grids where the kernel built it: ``P^pi`` dense by interpolation over a grid of means
    (:meth:`solver.mdp.GaussianGridKernel.dense_policy_matrix`, within 1e-12 of the windowed one; under MPI
    each rank builds its dense rows and they are gathered). One state (serial): ``P^pi = sum_j m_j`` and
    ``V = r^pi / (1 - gamma P^pi)`` without building a matrix (:meth:`Resolvent.one_state`; the same numbers as
    the ``1 x 1`` LU, tests/test_fast_paths.py).
    """
    rows = slice(None) if partition is None else partition.rows
    masses = p * mdp.weights
    # log p kept for the consumers of this policy (small enough); the same entropy bit for bit for p > 0
    log_p = policy_log(p) if 8 * p.size <= budget.KL_CHUNK_BYTES else None
    r_pi = np.einsum("ij,ij->i", masses, mdp.reward[rows]) - mdp.tau * kl_divergence(mdp, p, mdp.log_mu, log_p)
    if partition is None and mdp.n_states == 1:  # P^pi = sum_j m_j T_j11 = sum_j m_j (the one state's kernel is 1)
        resolvent = Resolvent.one_state(float(masses.sum()), mdp.gamma)
        V = resolvent.solve(r_pi)
        return Evaluation(V=V, Q=q_values(mdp, V), resolvent=resolvent, log_p=log_p)
    if partition is None:
        P = mdp.kernel.dense_policy_matrix(masses)  # the interpolated dense P^pi where the kernel built it
        resolvent = Resolvent(mdp.kernel.policy_matrix(masses) if P is None else P, mdp.gamma)
        V = resolvent.solve(r_pi)
        return Evaluation(V=V, Q=q_values(mdp, V), resolvent=resolvent, log_p=log_p)
    dense = mdp.kernel.dense_policy_matrix(masses, rows)
    if dense is None and mdp.states.ndim == 2 and mdp.n_states > DENSE_STATES:  # serially GMRES: distributed
        resolvent = DistributedResolvent(mdp.kernel.policy_matrix(masses, rows), mdp.gamma, partition, mdp.rho)
        V = partition.gather(resolvent.solve_local(r_pi))
    else:  # this rank's rows of P^pi (the interpolated dense ones, N x N doubles, or CSR), gathered and replicated
        if dense is None:
            P, r_all = partition.gather_csr(mdp.kernel.policy_matrix(masses, rows)), partition.gather(r_pi)
        else:  # r^pi as one more column: one gather (the Resolvent copies P into its LU's array)
            both = partition.gather(np.column_stack([dense, r_pi]))
            P, r_all = both[:, :-1], both[:, -1]
        resolvent = Resolvent(P, mdp.gamma)
        V = resolvent.solve(r_all)
    own_Q = mdp.reward[rows] + mdp.gamma * mdp.kernel.expect(V, rows)
    return Evaluation(V=V, Q=None, resolvent=resolvent, log_p=log_p, own_Q=own_Q)


def q_values(mdp: MDP, V: np.ndarray) -> np.ndarray:
    """``Q_ij = R_ij + gamma sum_k T_ijk V_k``."""
    Q = mdp.kernel.expect(V)  # in place from here: no (N, M) temporaries
    Q *= mdp.gamma
    Q += mdp.reward
    return Q


def log_gibbs(mdp: MDP, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-density of the discrete Gibbs policy and ``tau log Z``.

    Returns:
        ``(log G, tau log Z)`` with ``log G_ij = log mu_j + Q_ij / tau - log Z_i``, ``(N, M)`` and ``(N,)``;
        ``tau log Z`` is the soft Bellman operator applied to the ``V`` that produced ``Q``.
    """
    logits = Q / mdp.tau  # updated in place: one (N, M) temporary besides the result
    logits += mdp.log_mu
    shift = logits.max(axis=1, keepdims=True)
    logits -= shift
    log_z = np.log(weigh(np.exp(logits), mdp.weights))[:, None]
    logits -= log_z
    return logits, mdp.tau * (log_z + shift)[:, 0]


def gibbs(mdp: MDP, Q: np.ndarray) -> np.ndarray:
    """Discrete Gibbs policy ``G_ij = mu_j exp(Q_ij / tau) / Z_i`` (density, ``(N, M)``)."""
    return np.exp(log_gibbs(mdp, Q)[0])


def soft_bellman(mdp: MDP, V: np.ndarray) -> np.ndarray:
    """Soft Bellman operator ``(T V)_i = tau log sum_j w_j mu_j exp(Q_ij / tau)``, ``Q = R + gamma T V``."""
    return log_gibbs(mdp, q_values(mdp, V))[1]


def weigh(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x @ w`` (``(n, M) @ (M,)``, sums over the action DOFs) on one BLAS thread for ``n <= SMALL_BLAS_ROWS``.

    The same BLAS matrix-vector product (to an ulp: the threaded kernel may split a row's sum differently), without
    waking OpenBLAS's second thread, which has gone to sleep between two steps: measured on lqr_1d (121 x 257,
    2 cores) ~0.2 ms per product with the wake-up, 5 us without.
    """
    with single_threaded_blas(x.shape[0] if x.ndim == 2 else 0):
        return x @ w


#: The floor of :func:`policy_log`, the smallest normal double: ``policy_log(p)`` is ``log p`` exactly where
#: ``p >= LOG_FLOOR`` (so consumers of :attr:`Evaluation.log_p` can tell where it is the true logarithm).
LOG_FLOOR = float(np.finfo(float).tiny)


def policy_log(p: np.ndarray) -> np.ndarray:
    """``log max(p, LOG_FLOOR)``: the logarithm of a density with ``p log p = 0`` at ``p = 0``
    (``0 * log tiny = 0``), shared by the entropy and the dissipation."""
    return np.log(np.maximum(p, LOG_FLOOR))


def kl_divergence(mdp: MDP, p: np.ndarray, log_q: np.ndarray, log_p: np.ndarray | None = None) -> np.ndarray:
    """``KL_i(p || q) = sum_j w_j p_ij log(p_ij / q_ij)`` per state, ``0 log 0 = 0``.

    ``log_q`` is ``(N, M)`` or ``(M,)`` (the same for every state). Computed in chunks of states whose
    temporaries stay below :data:`solver.budget.KL_CHUNK_BYTES`. ``log_p``: :func:`policy_log` of ``p`` when the
    caller has it (then one pass, no logarithm). A strictly positive chunk (the flows keep ``p > 0``) skips the
    masking of zeros: the same operations on the same numbers, so the same result bit for bit.
    """
    n, m = p.shape
    if log_p is not None:  # p log p = 0 at p = 0 through log_p's floor; w_j p_ij (log p - log q) summed over j
        integrand = log_p - log_q
        integrand *= p
        return weigh(integrand, mdp.weights)
    out = np.empty(n)
    size = max(1, budget.KL_CHUNK_BYTES // (8 * m))
    for start in range(0, n, size):
        rows = slice(start, start + size)
        pc = p[rows]
        if pc.min() > 0:
            integrand = np.log(pc)
            integrand -= log_q[rows] if log_q.ndim == 2 else log_q
            integrand *= pc
            out[rows] = weigh(integrand, mdp.weights)
            continue
        positive = pc > 0
        integrand = np.log(np.where(positive, pc, 1.0))
        integrand -= log_q[rows] if log_q.ndim == 2 else log_q
        np.multiply(pc, integrand, out=integrand, where=positive)
        integrand[~positive] = 0.0
        out[rows] = weigh(integrand, mdp.weights)
    return out


def uniform_policy(mdp: MDP) -> np.ndarray:
    """``p_ij = 1 / |A|``."""
    return np.full((mdp.n_states, mdp.n_actions), 1.0 / mdp.space.volume)


@dataclass
class Optimum:
    """``V*``, ``Q*``, ``pi*`` of the discrete problem, and the number of SPI iterations used."""

    V: np.ndarray
    Q: np.ndarray
    p: np.ndarray
    iterations: int
    residual: float


class ConvergenceError(RuntimeError):
    """Soft policy iteration did not reach its tolerance."""


def soft_policy_iteration(mdp: MDP, p0: np.ndarray | None = None, tol: float = 1e-12,
                          max_iter: int = 200) -> Optimum:
    """Soft policy iteration ``p_{k+1} = G^{pi_k}`` (theory.md §2), from ``p0`` (default: uniform).

    Stops when ``||V_{k+1} - V_k||_inf <= tol * max(1, ||V_k||_inf)``. Monotone: ``V_{k+1} >= V_k``.
    ``residual`` is ``||T V* - V*||_inf``.
    """
    p = uniform_policy(mdp) if p0 is None else p0
    ev = evaluate(mdp, p)
    for k in range(1, max_iter + 1):
        p = gibbs(mdp, ev.Q)
        ev.resolvent.release()  # one P^pi at a time (the largest array of a big state grid)
        new = evaluate(mdp, p)
        change = np.max(np.abs(new.V - ev.V))
        ev = new
        if not np.isfinite(change):
            raise ConvergenceError("soft policy iteration produced non-finite values")
        if change <= tol * max(1.0, np.max(np.abs(ev.V))):
            residual = float(np.max(np.abs(soft_bellman(mdp, ev.V) - ev.V)))
            return Optimum(V=ev.V, Q=ev.Q, p=gibbs(mdp, ev.Q), iterations=k, residual=residual)
    raise ConvergenceError(f"soft policy iteration did not converge in {max_iter} iterations")
