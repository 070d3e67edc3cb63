"""MPI over states: ``mpirun -n K wpgflow run CONFIG`` splits the ``N`` states into ``K`` contiguous blocks.

Design (one rank = one block of states; the action mesh is replicated per rank, built with ``MPI.COMM_SELF``
in :mod:`solver.fem`; every rank builds the same MDP and solves for ``pi*`` by itself):

* **Own block** (rows ``lo:hi`` of every ``(N, ...)`` array, :attr:`Partition.rows`): the policy reward
  ``r^pi`` and the rows of ``P^pi`` (theory.md §2), the rows of ``Q = R + gamma T V``, the implicit Euler step
  of the flow (theory.md §3, :func:`solver.flows.implicit_step` on a block of states) and the statewise
  diagnostics ``D^h`` and ``KL(pi_s || G_s)``. These are the ``O(N M L)`` and ``O(N M)`` parts of a step.
* **Gathered every step** (``MPI_Allgatherv``, so every rank holds the full array): ``r^pi`` ``(N,)`` and
  ``P^pi`` (dense rows where the kernel interpolates it, :meth:`solver.mdp.GaussianGridKernel.dense_policy_matrix`,
  else CSR rows). The policy, ``Q`` and ``g`` stay distributed (:attr:`solver.flows.FlowState.own_p`, ...): they
  are gathered (:meth:`solver.flows.FlowState.gather`) only for a state whose consumers read every state: a
  snapshot, a checkpoint, the last state, or where rank 0's observers ask for it
  (:meth:`solver.observers.Observer.needs_full`, rank 0's answer broadcast).
* **Replicated**: the LU of ``I - gamma P^pi`` (``N x N``) and the solves for ``V`` and the adjoint
  ``(I - gamma P^pi)^{-T} rho``: ``O(N^3)`` once per step, cheap next to the ``O(N M L)`` row work (run on one
  BLAS thread, :func:`single_threaded_blas`). On 2D state grids above ``bellman.DENSE_STATES`` states (GMRES when
  serial) the system is **distributed** instead: each rank's rows of ``P^pi`` go into a PETSc matrix, PETSc's
  GMRES solves it, and only ``V`` is gathered (:class:`solver.bellman.DistributedResolvent`).
* **BLAS threads**: a partition of ``K > 1`` ranks caps each rank at ``cores // K`` BLAS threads
  (:func:`limit_blas_threads`), so that the ranks do not oversubscribe the node; small products and
  factorisations run on one thread anyway (:func:`single_threaded_blas`).
* **Compiled kernels** (:func:`compiled`): numba, when Debian's python3-numba is installed, for loops numpy
  cannot vectorise (the implicit step's chain solve); every caller keeps a pure-numpy path.
* Each row is computed by the same operations as in the serial run (row slices of the same arrays, and
  block-diagonal per-state solves), so MPI results equal serial ones to round-off (tests/test_mpi.py).
* Control decisions (adaptive step acceptance, ``gap <= gap_tol``) use values reduced over, or broadcast
  from, all ranks, so every rank takes the same branch.
* **Observers**: rank 0's (history, snapshots, hypothesis ledger, progress) run on rank 0 alone; the
  local-rate check (:class:`solver.along_flow.LocalRates`, a *collective* observer) runs on every rank on its
  own states and reduces its sums and minima (:meth:`Partition.reduce`), so the ranks do not wait for rank 0
  through its per-state eigen-solves. :attr:`Partition.collective_time` is the time a rank spent in the
  collectives (``mpi_collective_time_s`` of ``summary.json``: communication plus waiting).

Outputs (run directory, progress bar, report, plots) come from rank 0 only (:func:`solver.cli.execute`).
Memory per rank: the whole MDP (reward ``N M``, kernel ``N M L`` values, the ``(N, M)`` policy and ``Q``);
only the time per step is divided by ``K``. Only ``flow.kind = "wasserstein"`` runs under ``K > 1``.

Run: ``mpirun -n K .venv/bin/wpgflow run CONFIG`` (one rank per core; ``-q`` drops Open MPI's own banner when a
rank exits with a non-zero code, so a bad config gives exactly one line; as root Open MPI also needs
``--allow-run-as-root``). Other commands (``sweep``, ``plot``, ``lsi``) refuse to run on more than one rank.

Without MPI, or with one rank, :func:`world_comm` is None and ``Partition(None, n)`` is serial: its gathers
return their argument.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import scipy.sparse as sp

from . import LAUNCHER_SIZE_VARIABLES  # Open MPI, MPICH/Hydra and Slurm's PMI, PMIx
from .config import ConfigError

#: Environment variables by which MPI launchers announce this process's rank; with LAUNCHER_SIZE_VARIABLES they
#: are used to refuse commands that are not MPI-parallel without initialising MPI.
_LAUNCHER_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def _timed(method):
    """A :class:`Partition` collective that adds its wall time to ``collective_time`` (on several ranks)."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        if self.serial:
            return method(self, *args, **kwargs)
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.collective_time += time.perf_counter() - start
    return timed


class Partition:
    """Contiguous blocks of ``n`` states over the ranks of ``comm`` (``comm`` None: one serial block).

    Rank ``r`` owns states ``starts[r] : starts[r] + counts[r]``; the first ``n % K`` ranks get one more.

    Attributes:
        comm: the MPI communicator, or None.
        rank, size: this rank and the number of ranks.
        counts, starts: ``(K,)`` block sizes and first states.
        rows: ``slice`` of this rank's states.
        collective_time: seconds this rank spent in the collectives below (communication and waiting for the
            other ranks; PETSc's own inside :class:`solver.bellman.DistributedResolvent` not counted), 0 serially.
    """

    def __init__(self, comm, n: int):
        self.comm = comm
        self.size = 1 if comm is None else comm.Get_size()
        self.rank = 0 if comm is None else comm.Get_rank()
        if n < self.size:
            raise ConfigError(f"states.n: {n} states cannot be split over {self.size} MPI ranks; "
                              f"use at most {n} ranks")
        self.n = n
        self.counts = np.full(self.size, n // self.size) + (np.arange(self.size) < n % self.size)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.rows = slice(int(self.starts[self.rank]), int(self.starts[self.rank] + self.counts[self.rank]))
        self.collective_time = 0.0
        if self.size > 1:
            limit_blas_threads(max(1, (os.cpu_count() or 1) // self.size))

    @property
    def serial(self) -> bool:
        return self.size == 1

    @property
    def root(self) -> bool:
        """True on the rank that writes outputs (rank 0)."""
        return self.rank == 0

    @_timed
    def gather(self, local: np.ndarray) -> np.ndarray:
        """Allgatherv of the own rows: ``local`` ``(counts[rank], ...)`` -> the full ``(n, ...)`` on every rank."""
        return self._gather(local)

    def _gather(self, local: np.ndarray) -> np.ndarray:
        if self.serial:
            return local
        local = np.ascontiguousarray(local, dtype=float)
        row = int(np.prod(local.shape[1:], dtype=np.int64))
        full = np.empty((self.n,) + local.shape[1:])
        self.comm.Allgatherv(local, [full, self.counts * row, self.starts * row, _mpi().DOUBLE])
        return full

    @_timed
    def gather_csr(self, block: sp.csr_matrix) -> sp.csr_matrix:
        """The full CSR matrix from every rank's block of rows (same ``data``/``indices`` as a serial build)."""
        if self.serial:
            return block
        per_row = self._gather(np.diff(block.indptr).astype(float)).astype(np.int64)
        indptr = np.concatenate([[0], np.cumsum(per_row)])
        nnz = indptr[self.starts + self.counts] - indptr[self.starts]
        data = np.empty(indptr[-1])
        indices = np.empty(indptr[-1], dtype=np.int64)
        MPI = _mpi()
        self.comm.Allgatherv(np.ascontiguousarray(block.data, dtype=float),
                             [data, nnz, indptr[self.starts], MPI.DOUBLE])
        self.comm.Allgatherv(np.ascontiguousarray(block.indices, dtype=np.int64),
                             [indices, nnz, indptr[self.starts], MPI.INT64_T])
        return sp.csr_matrix((data, indices, indptr), shape=(self.n, block.shape[1]))

    def max(self, value: float) -> float:
        """Maximum of the number ``value`` over the ranks (:meth:`reduce`)."""
        return value if self.serial else float(self.reduce([value], "max")[0])

    @_timed
    def reduce(self, values, op: str = "sum") -> np.ndarray:
        """Entrywise ``"sum"`` or ``"max"`` of the float vector ``values`` over the ranks, on every rank (one
        ``MPI_Allreduce``; serial: ``values`` as an array)."""
        values = np.ascontiguousarray(values, dtype=float)
        if self.serial:
            return values
        out = np.empty_like(values)
        self.comm.Allreduce(values, out, op={"sum": _mpi().SUM, "max": _mpi().MAX}[op])
        return out

    @_timed
    def combine(self, values, ops: tuple[str, ...]) -> np.ndarray:
        """Several small reductions in one collective: each rank's float vector ``values`` is gathered onto every
        rank (one ``MPI_Allgather``) and entry ``i`` is combined over the ranks by ``ops[i]``, ``"sum"`` (in rank
        order) or ``"max"`` (serial: ``values`` as an array). One synchronisation instead of one per operation:
        each one makes the ranks wait for the slowest."""
        values = np.ascontiguousarray(values, dtype=float)
        if self.serial:
            return values
        table = np.empty((self.size, values.size))
        self.comm.Allgather(values, table)
        return np.array([table[:, i].sum() if op == "sum" else table[:, i].max() for i, op in enumerate(ops)])

    @_timed
    def owned(self, local: np.ndarray) -> np.ndarray:
        """The global state indices ``local`` (indices into this rank's rows) of every rank, on every rank."""
        local = np.asarray(local, dtype=np.int64) + self.rows.start
        return local if self.serial else np.concatenate(self.comm.allgather(local))

    @_timed
    def bcast(self, value):
        """Rank 0's ``value`` on every rank."""
        return value if self.serial else self.comm.bcast(value, root=0)


def _mpi():
    from mpi4py import MPI

    return MPI


#: Dense LAPACK/BLAS work on matrices with at most this many rows runs on one BLAS thread
#: (:func:`single_threaded_blas`): OpenBLAS's threads cost more than they save there (measured on 2 cores: the
#: 121 x 121 LU of lqr_1d takes 4.1 ms with 2 threads, 0.40 ms with one; README "Performance").
SMALL_BLAS_ROWS = 2000

_BLAS = []  # [threadpoolctl controller of the BLAS libraries or None, then its _OneThread], built on first use


def limit_blas_threads(threads: int) -> None:
    """Cap the BLAS threads of this process for good (an MPI rank: ``cores // ranks``, so that ``K`` ranks with
    OpenBLAS's default of one thread per core do not oversubscribe the node; measured on 2 cores: 2 ranks x 2
    threads made ``mpirun -n 2`` 2.9x slower than one rank). A no-op without threadpoolctl."""
    controller = _controller()
    if controller is not None:
        controller.limit(limits=threads, user_api="blas")  # not restored: the limit lasts as long as the process


def _controller():
    """The threadpoolctl controller of the BLAS libraries (built once), or None without threadpoolctl."""
    if not _BLAS:
        try:
            import threadpoolctl

            controller = threadpoolctl.ThreadpoolController()
            controller = controller.select(user_api="blas")
            _BLAS.append(controller if controller.lib_controllers else None)
        except ImportError:
            _BLAS.append(None)
    return _BLAS[0]


def single_threaded_blas(rows: int = 0):
    """A context manager running the BLAS calls inside it on one thread if ``rows <= SMALL_BLAS_ROWS``.

    Uses threadpoolctl (Debian's python3-threadpoolctl) when it is installed, and does nothing otherwise (the
    results are the same to round-off either way: the thread count only changes the blocking of the sums).
    About 2 us per use.
    """
    import contextlib

    if rows > SMALL_BLAS_ROWS:
        return contextlib.nullcontext()
    controller = _controller()
    if controller is None:
        return contextlib.nullcontext()
    if len(_BLAS) == 1:
        _BLAS.append(_OneThread.functions(controller.lib_controllers))
    return _OneThread(_BLAS[1])


class _OneThread:
    """One thread in each BLAS library for the ``with`` block, then the previous counts.

    threadpoolctl's ``limit`` and its controllers' ``set_num_threads`` re-filter or re-resolve on every use
    (measured 27-50 us a pair); for OpenBLAS the two C functions are resolved once from the library file
    threadpoolctl found (0.5 us a pair), other BLAS libraries go through their threadpoolctl controller.
    """

    def __init__(self, pairs: list[tuple]):
        self.pairs = pairs

    @staticmethod
    def functions(libraries) -> list[tuple]:
        """``(get, set)`` of the thread count of each library (resolved once, by :func:`single_threaded_blas`)."""
        pairs = []
        for lib in libraries:
            if lib.internal_api == "openblas" and lib.filepath:
                import ctypes

                so = ctypes.CDLL(lib.filepath)
                pairs.append((so.openblas_get_num_threads, so.openblas_set_num_threads))
            else:
                pairs.append((lib.get_num_threads, lib.set_num_threads))
        return pairs

    def __enter__(self):
        self.previous = [get() for get, _ in self.pairs]
        for _, set_threads in self.pairs:
            set_threads(1)

    def __exit__(self, *exc):
        for (_, set_threads), threads in zip(self.pairs, self.previous):
            set_threads(threads)
        return False


def world_comm():
    """``MPI.COMM_WORLD`` if it has more than one rank, else None (serial)."""
    comm = _mpi().COMM_WORLD
    return comm if comm.Get_size() > 1 else None


def _launcher(variables: tuple[str, ...], default: int) -> int:
    for name in variables:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return default


def launched_size() -> int:
    """Number of ranks announced by an MPI launcher's environment (1 without one); does not initialise MPI."""
    return _launcher(LAUNCHER_SIZE_VARIABLES, 1)


def launched_rank() -> int:
    """This process's rank announced by an MPI launcher's environment (0 without one); does not initialise MPI."""
    return _launcher(_LAUNCHER_RANK_VARIABLES, 0)


def agree(error: ConfigError | None, comm) -> None:
    """Collective: if any rank of ``comm`` (None: serial) has a ConfigError, raise one on every rank.

    The message is the lowest failing rank's, so that rank 0 can print it for all (one line, exit code 2).
    """
    if comm is None:
        if error is not None:
            raise error
        return
    messages = comm.allgather(None if error is None else str(error))
    failed = [m for m in messages if m is not None]
    if failed:
        raise ConfigError(failed[0])


#: Compiled kernels are used from this many (state, DOF) pairs on. Importing numba costs ~0.5 s once per process;
#: on lqr_1d (121 x 257 = 31097 pairs) they save ~0.65 ms per step (the chain solve 0.20 ms instead of 0.74, the
#: histogram of P^pi 0.24 instead of 0.40), so small problems and one-state bandits never import it.
COMPILED_MIN_ENTRIES = 16384

#: ``WPGFLOW_NUMBA=0`` in the environment turns the compiled kernels off (:func:`compiled`): every caller then
#: takes its pure-numpy path (the reference the compiled kernels are tested against, tests/test_fast_paths.py).
NUMBA_VARIABLE = "WPGFLOW_NUMBA"

_COMPILED: dict = {}


def compiled_available(entries: int) -> bool:
    """Whether a run of ``entries`` (state, DOF) pairs will use the compiled kernels (and so import numba: its
    memory, :data:`solver.budget.COMPILED_BYTES`): numba installed, not turned off, and at least
    :data:`COMPILED_MIN_ENTRIES` pairs. Does not import numba."""
    import importlib.util

    return (entries >= COMPILED_MIN_ENTRIES and os.environ.get(NUMBA_VARIABLE, "1") != "0"
            and importlib.util.find_spec("numba") is not None)


def compiled(fn, signature: str):
    """``fn`` compiled by numba for ``signature`` (``njit``, eagerly, cached on disk next to the source), or None.

    None without numba (Debian's python3-numba is optional), when :data:`NUMBA_VARIABLE` is ``0``, or if the
    compilation fails: the caller then takes its pure-numpy path (the two agree to round-off, tested). numba is
    imported on the first call (~0.5 s once per process), so a run that never reaches a compiled kernel never
    pays for it; each kernel is compiled once per process (the first compilation ever ~1 s, later processes load
    the on-disk cache, ~0.1 s).
    """
    if os.environ.get(NUMBA_VARIABLE, "1") == "0":
        return None
    key = (fn, signature)
    if key not in _COMPILED:
        try:
            import warnings

            with warnings.catch_warnings():  # llvmlite 0.39 imports with a DeprecationWarning of importlib
                warnings.simplefilter("ignore", DeprecationWarning)
                import numba

                _COMPILED[key] = numba.njit(signature, cache=True, nogil=True)(fn)
        except Exception:  # no numba, or a numba that cannot compile this here: the numpy path
            _COMPILED[key] = None
    return _COMPILED[key]
