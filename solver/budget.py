"""Resource budgets: every working-memory limit of the package, the memory formula of a run, and one helper that
processes states in chunks below a budget.

This module imports nothing from the package, so every layer can use it.

Memory of a WPG run on a 2D state grid (:func:`memory_estimate`; an upper bound of the measured peak, tested in
``tests/test_memory.py``)::

    176 MiB + 8 N M (14 + [Lx + Ly if stored]) + 12 N bx by + 192 MiB [+ 96 MiB for numba]

with ``14`` policy-sized arrays alive at the peak (:data:`POLICY_ARRAYS`), ``bx, by`` the per-state bands of
``P^pi`` (``L`` plus the spread of the next-state means over the actions, in grid steps), two 64 MiB chunk
workspaces and the snapshots' 64 MiB. 101 x 101 states x 1013 action DOFs with ``sigma / h = 2.5`` (``L = 47``,
band 57): 1.81 GiB by the formula (``benchmarks/bench_memory.py`` prints the measured peak; README "2D state
grids").
"""

from __future__ import annotations

MIB = 2 ** 20

#: Working memory of one chunk of per-state flow solves and edge computations (banded storage incl. LAPACK's
#: pivoting rows, or the CSC matrix and its LU fill); states are processed in chunks below this size.
SOLVE_CHUNK_BYTES = 64 * MIB

#: Largest dense per-state band of the 1D-grid kernel (``N * M * band`` doubles) kept for the einsum of the numpy
#: ``P^pi`` path; larger kernels scatter-add their windows (~8x slower per entry). Where numba runs, neither is
#: used: the compiled windowed product is faster than both (solver.mdp.GaussianGridKernel.policy_matrix).
DENSE_BAND_BYTES = 256 * MIB

#: 2D state grids: largest storage of the kernel's two 1D windows per (state, action), ``8 N M (Lx + Ly)``
#: bytes; above it only the means ``f_ij`` are kept and the windows are recomputed in every call.
WINDOW_STORE_BYTES = 512 * MIB

#: 2D state grids: working memory of one chunk of states in ``expect`` / ``policy_matrix``.
KERNEL_CHUNK_BYTES = 64 * MIB

#: Temporaries of one chunk of :func:`solver.bellman.kl_divergence` (about three per chunk).
KL_CHUNK_BYTES = 16 * MIB

#: Snapshots keep the policy of every state while ``K N M`` doubles fit in this budget; above it, only the states
#: drawn in ``density.png`` and written to ``density.xdmf``, so that a run's memory stays ``O(N M)``.
SNAPSHOT_BYTES = 64 * MIB

#: Arrays of ``N x M`` doubles alive at the peak of a WPG step, counted while a new policy is evaluated: the
#: reward, the next-state means (2 for a 2D grid), the window starts (two int32), ``pi*`` and ``Q*`` (6); the
#: previous flow state, kept until the new one is valid (``p``, ``Q``, ``g``: 3); the new masses and policy (2);
#: in policy evaluation the masses and the new ``Q`` (2); the policy where the gap entered the rate-fit window
#: (:class:`solver.modes.WindowStart`, 1). Chunk temporaries are in :data:`KERNEL_CHUNK_BYTES`.
POLICY_ARRAYS = 14

#: Interpreter, numpy/scipy/DOLFINx/matplotlib, the action mesh and the plots, bytes (a whole run on 3 x 3
#: states peaks at 170 MiB).
BASE_BYTES = 176 * MIB

#: numba and its LLVM JIT once a compiled kernel is loaded (measured 86 MiB on Debian 12), counted where the run
#: uses them (:func:`solver.parallel.compiled_available`; Debian 13's peak exceeded the formula by 21 MiB without it).
COMPILED_BYTES = 96 * MIB


def window_bytes(n_states: int, n_actions: int, lx: int, ly: int) -> int:
    """Bytes of the stored window values of a 2D-grid kernel: ``8 N M (Lx + Ly)``."""
    return 8 * n_states * n_actions * (lx + ly)


def memory_estimate(n_states: int, n_actions: int, width: tuple[int, int], band: tuple[int, int],
                    stored: bool, compiled: bool = False) -> int:
    """Peak memory of a WPG run on a 2D state grid, bytes: the formula of the module docstring.

    ``BASE + 8 N M (POLICY_ARRAYS + [Lx + Ly if the windows are stored]) + 12 N bx by + 3 x 64 MiB``:
    policy-sized arrays, the kernel's windows, one ``P^pi`` in CSR (a double and an int32 per non-zero; the runner
    frees the previous one before the next is built), the chunk workspaces of the kernel and of the flow step,
    and the snapshots' policies; ``compiled``: plus :data:`COMPILED_BYTES` (the run loads numba).

    >>> memory_estimate(1, 1, (1, 1), (1, 1), stored=False) // MIB
    368
    """
    per_policy = 8 * n_states * n_actions
    windows = window_bytes(n_states, n_actions, *width) if stored else 0
    return (BASE_BYTES + POLICY_ARRAYS * per_policy + windows + 12 * n_states * band[0] * band[1]
            + KERNEL_CHUNK_BYTES + SOLVE_CHUNK_BYTES + SNAPSHOT_BYTES + (COMPILED_BYTES if compiled else 0))


def chunks(n: int, per_state_bytes: float, budget: int | None = None) -> list[slice]:
    """Consecutive slices of ``range(n)`` whose working memory (``per_state_bytes`` each) stays below ``budget``
    (default: :data:`SOLVE_CHUNK_BYTES`, read at call time so that tests can lower it).

    >>> chunks(5, 1.0, budget=2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    size = max(1, int((SOLVE_CHUNK_BYTES if budget is None else budget) // max(per_state_bytes, 1.0)))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def by_state_chunks(space, fn, *arrays):
    """``fn(*arrays)`` evaluated on consecutive chunks of states (rows), concatenated.

    Statewise edge computations hold several ``(N, E)`` arrays (``space``: an action space with ``edges`` and
    ``n_dofs``); chunks keep them (about 8 doubles per edge and DOF and state) below :data:`SOLVE_CHUNK_BYTES`, so
    memory does not grow with ``N`` (101 x 101 states x 1000 DOFs would otherwise need ~5 GiB). Each row is
    computed by the same operations whatever the chunking.
    """
    import numpy as np

    parts = chunks(arrays[0].shape[0], 64 * (space.edges.shape[0] + space.n_dofs))
    if len(parts) == 1:
        return fn(*arrays)
    return np.concatenate([fn(*(a[part] for a in arrays)) for part in parts])
