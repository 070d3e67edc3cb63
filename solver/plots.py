"""Plots of a run directory, drawn from its files alone (so ``wpgflow plot RUN_DIR`` can redraw them).

* ``convergence.png``: the gap ``J* - J`` against ``t`` (log scale) with the fitted linear rate and the
  predicted asymptotic rate; beside it the measured ``(J_{n+1} - J_n) / dt`` against the predicted
  ``dJ/dt`` (math.md §4) and ``tau max_s KL(pi_s || G_s)``, the Bellman residual.
* ``density.png``: for up to three states, the density ``p(t, a)`` over time and action (colour), and
  the density at a few snapshot times beside ``pi*``.
* ``policy.png``: the final policy and ``pi*`` over ``(s, a)``, and their difference.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from .outputs import read_run  # noqa: E402


def plot_run(path: Path) -> list[Path]:
    """Draw all plots of the run in ``path``; return the files written."""
    summary, history, solution = read_run(path)
    return [convergence(path, summary, history), density(path, summary, solution),
            policy(path, solution)]


def convergence(path: Path, summary: dict, history: dict) -> Path:
    t, gap = history["t"], history["gap"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    positive = gap > 0
    ax1.semilogy(t[positive], gap[positive], color="C0", lw=2, label=r"$J^*-J(t)$")
    if summary.get("rate") is not None:
        lo, hi = summary["rate_t_range"]
        tt = np.linspace(lo, hi, 50)
        # anchor the fitted line at the fit window's first point
        g0 = np.interp(lo, t, gap)
        ax1.semilogy(tt, g0 * np.exp(-summary["rate"] * (tt - lo)), "--", color="C3", lw=2,
                     label=f"fit: rate {summary['rate']:.4g} ($r^2$ = {summary['rate_r2']:.4f})")
    if summary.get("predicted_rate") is not None:
        t_end = t[positive][-1] if positive.any() else t[-1]
        g_end = gap[positive][-1] if positive.any() else 1.0
        tt = np.linspace(0.5 * t_end, t_end, 20)
        ax1.semilogy(tt, g_end * np.exp(-summary["predicted_rate"] * (tt - t_end)), ":", color="k", lw=2,
                     label=f"predicted asymptotic rate {summary['predicted_rate']:.4g}")
    ax1.set_xlabel("flow time t")
    ax1.set_ylabel(r"gap $J^*-J(t)$")
    ax1.set_title(f"{summary['model']}: convergence of the gap")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()

    dt = np.diff(t)
    measured = np.diff(history["J"]) / np.where(dt > 0, dt, np.nan)
    ax2.semilogy(t[:-1], np.abs(measured), color="C0", lw=2, label=r"measured $(J_{n+1}-J_n)/\Delta t$")
    ax2.semilogy(t, history["dissipation"], "--", color="C1", lw=2,
                 label=r"predicted $dJ/dt=\rho^\top(I-\gamma P^\pi)^{-1}D^h$")
    ax2.set_xlabel("flow time t")
    ax2.set_ylabel("energy rate (per unit time)")
    ax2.set_title("energy dissipation")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    out = path / "convergence.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _states_to_show(n: int) -> list[int]:
    return sorted({n // 4, n // 2, (3 * n) // 4}) if n >= 3 else list(range(n))


def density(path: Path, summary: dict, solution: dict) -> Path:
    times, snaps = solution["snapshots_t"], solution["snapshots_pi"]
    a, states, pi_star = solution["actions"], solution["states"], solution["pi_star"]
    shown = _states_to_show(states.size)
    fig, axes = plt.subplots(2, len(shown), figsize=(5 * len(shown), 8), squeeze=False)
    # time axis: snapshot times are geometric, so draw rows between midpoints on a symlog axis
    edges = _edges(times)
    linthresh = times[1] if times.size > 1 and times[1] > 0 else 1.0
    vmax = max(float(np.max(snaps[:, shown])), float(np.max(pi_star[shown])))
    for col, i in enumerate(shown):
        top, bottom = axes[0, col], axes[1, col]
        mesh = top.pcolormesh(_edges(a), edges, snaps[:, i], shading="flat", cmap="viridis", vmin=0, vmax=vmax)
        top.set_yscale("symlog", linthresh=linthresh)
        top.set_xlabel("action a")
        top.set_ylabel("flow time t")
        top.set_title(f"state s = {states[i]:.3g}: density p(t, a)")
        fig.colorbar(mesh, ax=top, label="policy density")
        colours = plt.cm.plasma(np.linspace(0, 0.9, min(6, times.size)))
        for colour, k in zip(colours, np.unique(np.linspace(0, times.size - 1, min(6, times.size)).astype(int))):
            bottom.plot(a, snaps[k, i], color=colour, lw=1.5, label=f"t = {times[k]:.3g}")
        bottom.plot(a, pi_star[i], "k--", lw=2, label=r"optimum $\pi^*$")
        bottom.set_xlabel("action a")
        bottom.set_ylabel("policy density")
        bottom.set_title(f"state s = {states[i]:.3g}: snapshots and optimum")
        bottom.grid(True, alpha=0.3)
        bottom.legend(fontsize=8)
    fig.tight_layout()
    out = path / "density.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around sorted nodes ``x`` (midpoints inside, the end nodes outside)."""
    return np.concatenate([[x[0]], 0.5 * (x[1:] + x[:-1]), [x[-1]]])


def policy(path: Path, solution: dict) -> Path:
    a, states = solution["actions"], solution["states"]
    final, star = solution["pi_final"], solution["pi_star"]
    if states.size == 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(a, final[0], lw=2, label=r"final policy $\pi_T$")
        ax.plot(a, star[0], "k--", lw=2, label=r"optimum $\pi^*$")
        ax.set_xlabel("action a")
        ax.set_ylabel("policy density")
        ax.set_title("final policy vs optimum (one state)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    else:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        vmax = float(max(final.max(), star.max()))
        for ax, data, title in ((axes[0], final, r"final policy $\pi_T(a\mid s)$"),
                                (axes[1], star, r"optimum $\pi^*(a\mid s)$")):
            mesh = ax.pcolormesh(a, states, data, shading="auto", cmap="viridis", vmin=0, vmax=vmax)
            fig.colorbar(mesh, ax=ax, label="policy density")
            ax.set_title(title)
        diff = np.abs(final - star)
        floor = max(float(diff.max()) * 1e-12, 1e-300)
        mesh = axes[2].pcolormesh(a, states, np.maximum(diff, floor), shading="auto", cmap="magma",
                                  norm=LogNorm(vmin=floor, vmax=max(float(diff.max()), 10 * floor)))
        fig.colorbar(mesh, ax=axes[2], label=r"$|\pi_T-\pi^*|$")
        axes[2].set_title(r"difference $|\pi_T-\pi^*|$")
        for ax in axes:
            ax.set_xlabel("action a")
            ax.set_ylabel("state s")
    fig.tight_layout()
    out = path / "policy.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
