"""``flow.kind = "particles"``: the particle picture of the WPG flow (theory.md §3; the nonparametric WPO),
reflected Langevin particles.

For every state ``s``, ``n`` particles follow

    da = grad_a( Q^{pi_t}(s, a) - tau U(a) ) dt + sqrt(2 tau) dW,      normal reflection at the ends of A,

whose law solves the WPG Fokker-Planck equation with no-flux boundary. The mean-field term ``Q^{pi_t}`` is
evaluated from the particles themselves:

* **density estimate (cloud in cell):** a particle in the cell ``[x_j, x_{j+1}]`` at ``theta = (a - x_j) /
  (x_{j+1} - x_j)`` gives mass ``(1 - theta) / n`` to DOF ``j`` and ``theta / n`` to DOF ``j + 1`` (the P1 hat
  functions), and the density is ``p_j = mass_j / w_j`` (lumped weights), so ``sum_j w_j p_j = 1`` exactly;
* **drift:** ``grad_a`` of the P1 interpolant of ``Q + tau log mu`` (constant on each cell), with ``Q`` from the
  soft policy evaluation of the estimated density at the start of the step;
* **time:** Euler-Maruyama, then reflection ``a -> 2 lo - a`` / ``2 hi - a`` (folded, so any overshoot
  lands inside). Weak error ``O(dt)`` in the interior and ``O(sqrt(dt))`` near the boundary (theory.md §8.8).

Initial positions are drawn exactly from the P1 interpolant of ``p0`` (cell by mass, then inverse CDF of the
linear density in the cell). Everything is vectorised over states and particles; the random stream is
``numpy.random.default_rng(seed)``, so a run is reproducible.

Only 1D action intervals are supported. In 2D the same scheme needs barycentric deposits on triangles, a
point-location search and reflection at a polygonal boundary; none is implemented.
"""

from __future__ import annotations

import math

import numpy as np

from ..fem import ActionSpace
from ..mdp import MDP
from .base import Flow, FlowState


def _check_interval(space: ActionSpace) -> None:
    if not space.is_chain:
        raise ValueError("the particle flow needs a 1D action interval numbered left to right")


def sample(space: ActionSpace, p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` positions per state from the P1 interpolant of the densities ``p``.

    Args:
        space: 1D action space (DOFs sorted left to right).
        p: ``(N, M)`` non-negative densities with ``sum_j w_j p_j = 1``.
        n: particles per state.
        rng: random generator.

    Returns:
        ``(N, n)`` positions.
    """
    _check_interval(space)
    x = space.coords[:, 0]
    h = np.diff(x)
    left, right = p[:, :-1], p[:, 1:]
    cum = np.cumsum(0.5 * h * (left + right), axis=1)  # (N, C) cumulative cell masses
    cum /= cum[:, -1:]
    rows, cells = p.shape[0], h.size
    offset = np.arange(rows)[:, None]
    # one searchsorted for all states: row i's cumulative masses live in [i, i + 1]
    flat = np.searchsorted((cum + offset).ravel(), (rng.random((rows, n)) + offset).ravel(), side="right")
    cell = np.clip(flat.reshape(rows, n) - offset * cells, 0, cells - 1)
    pj = np.take_along_axis(left, cell, axis=1)
    dp = np.take_along_axis(right, cell, axis=1) - pj
    # inverse CDF of the density (1 - theta) pj + theta (pj + dp) on [0, 1]: dp/2 theta^2 + pj theta = c
    c = rng.random((rows, n)) * (pj + 0.5 * dp)
    denominator = pj + np.sqrt(np.maximum(pj ** 2 + 2.0 * dp * c, 0.0))  # 0 only if c = 0 at a zero of p
    theta = 2.0 * c / np.maximum(denominator, np.finfo(float).tiny)
    return x[cell] + np.clip(theta, 0.0, 1.0) * h[cell]


def locate(space: ActionSpace, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell index ``j`` (``x_j <= a <= x_{j+1}``) and local coordinate ``theta`` in ``[0, 1]`` of positions ``a``.

    On a uniform mesh the cell is ``floor((a - x_0) / h)`` (arithmetic; a binary search over unsorted positions
    costs ~10x more), otherwise a binary search.
    """
    x = space.coords[:, 0]
    h = np.diff(x)
    if np.ptp(h) <= 1e-12 * h[0]:
        cell = np.clip(np.floor((a - x[0]) / h[0]).astype(np.intp), 0, h.size - 1)
    else:
        cell = np.clip(np.searchsorted(x, a, side="right") - 1, 0, h.size - 1)
    theta = np.clip((a - x[cell]) / h[cell], 0.0, 1.0)  # round-off at the nodes only
    return cell, theta


def deposit(space: ActionSpace, a: np.ndarray) -> np.ndarray:
    """Cloud-in-cell density estimate ``(N, M)`` of the positions ``a`` ``(N, n)``: P1 hat masses over ``w``."""
    _check_interval(space)
    rows, n = a.shape
    m = space.n_dofs
    cell, theta = locate(space, a)
    index = np.arange(rows)[:, None] * m + cell
    masses = (np.bincount(index.ravel(), (1.0 - theta).ravel(), rows * m)
              + np.bincount((index + 1).ravel(), theta.ravel(), rows * m))
    return masses.reshape(rows, m) / n / space.weights


def reflect(a: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Fold positions into ``[lower, upper]`` by repeated normal reflection at both ends."""
    length = upper - lower
    y = np.mod(a - lower, 2.0 * length)
    return lower + length - np.abs(y - length)


def drift(mdp: MDP, Q: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``grad_a (Q - tau U)`` at positions ``a`` ``(N, n)``, from the P1 interpolant (constant on each cell)."""
    x = mdp.space.coords[:, 0]
    phi = Q + mdp.tau * mdp.log_mu  # Q - tau U, (N, M)
    slope = np.diff(phi, axis=1) / np.diff(x)  # (N, C)
    cell, _ = locate(mdp.space, a)
    return np.take_along_axis(slope, cell, axis=1)


class Particles(Flow):
    """Reflected Langevin particles per state (Euler-Maruyama with reflection, module docstring).

    Each flow state carries the cloud-in-cell density ``p`` of the particles and its policy evaluation (whose
    ``Q`` drives the next step); the positions stay inside the flow. ``flow.particles`` per state, random stream
    ``numpy.random.default_rng(flow.seed)``. No dissipation and no predicted rate: the Fisher information of a
    particle histogram is dominated by sampling noise, and so is the gap's floor.
    """

    kind = "particles"
    actions_2d = False
    linear_rate = False

    #: positions, noise, drift and cell index of every particle, bytes
    BYTES_PER_PARTICLE = 32
    extra_bytes_key = "flow.particles"

    @classmethod
    def extra_bytes(cls, config, n_states: int) -> int:
        return cls.BYTES_PER_PARTICLE * n_states * config.particles

    def start(self, p0: np.ndarray) -> np.ndarray:
        space = self.mdp.space
        _check_interval(space)
        self._rng = np.random.default_rng(self.config.seed)
        self._bounds = float(space.coords[0, 0]), float(space.coords[-1, 0])
        self._a = sample(space, p0, self.config.particles, self._rng)
        return deposit(space, self._a)

    def advance(self, state: FlowState, t_end: float) -> tuple[np.ndarray, float, int]:
        t_new = self.fixed_time(state, t_end)
        h = t_new - state.t
        noise = math.sqrt(2.0 * self.mdp.tau) * math.sqrt(h) * self._rng.standard_normal(self._a.shape)
        self._a = reflect(self._a + drift(self.mdp, state.evaluation.Q, self._a) * h + noise, *self._bounds)
        return deposit(self.mdp.space, self._a), t_new, 0

    def checkpoint(self) -> dict[str, np.ndarray]:
        """Positions and the generator's state (``bit_generator.state`` as JSON text)."""
        import json

        return {"positions": self._a, "rng_state": np.array(json.dumps(self._rng.bit_generator.state))}

    def restore(self, p: np.ndarray, data: dict[str, np.ndarray]) -> None:
        import json

        space = self.mdp.space
        _check_interval(space)
        self._rng = np.random.default_rng(self.config.seed)
        self._rng.bit_generator.state = json.loads(str(data["rng_state"]))
        self._bounds = float(space.coords[0, 0]), float(space.coords[-1, 0])
        self._a = data["positions"]
