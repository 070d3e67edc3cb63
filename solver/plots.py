"""Plots of a run directory, drawn from its files alone (so ``wpgflow plot RUN_DIR`` can redraw them).

* ``convergence.png``: the gap ``J* - J`` against ``t`` (log scale) with the fitted linear rate and the
  predicted asymptotic rate; beside it the measured ``(J_{n+1} - J_n) / dt`` against the predicted
  ``dJ/dt`` (math.md §4) and ``tau max_s KL(pi_s || G_s)``, the Bellman residual.
* ``density.png``: for up to three states, the density ``p(t, a)`` over time and action (colour), and
  the density at a few snapshot times beside ``pi*``.
* ``policy.png``: the final policy and ``pi*`` over ``(s, a)``, and their difference.
* ``rates.png`` (Wasserstein runs, from ``rates.csv``): the local rate ``r(t)`` at the snapshots, the bound
  ``2 tau C_lo / kappa_t`` of math.md §5.3(c), the predicted asymptotic and the fitted rates (log y axis).

For 2D actions (``solution["actions"]`` of shape ``(M, 2)`` with ``cells``) density and policy are filled
contours on the action mesh: ``density.png`` shows up to three states (rows) at four snapshot times and ``pi*``
(columns), one colour scale per state; ``policy.png`` the final policy, ``pi*`` and their difference at the
middle state.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .outputs import read_run, shown_states, snapshot_rows  # noqa: E402


def plot_run(path: Path) -> list[Path]:
    """Draw all plots of the run in ``path``; return the files written."""
    summary, history, solution = read_run(path)
    written = [convergence(path, summary, history), density(path, summary, solution),
               policy(path, solution)]
    del solution  # (N, M) tables: not needed by rates.png
    rates_file = rates(path, summary)
    return written + ([rates_file] if rates_file else [])


def rates(path: Path, summary: dict) -> Path | None:
    """``rates.png`` from ``rates.csv`` (math.md §5.3(c)); None if the run has no ``rates.csv``."""
    from .lsi import read_rates

    table = read_rates(path)
    if table is None:
        return None
    t, r, bound = table["t"], table["local_rate"], table["bound"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ok = np.isfinite(r) & (r > 0)
    ax.semilogy(t[ok], r[ok], "o-", color="C0", lw=2, label=r"local rate $r(t)=\dot J/(J^*-J)$")
    positive = np.isfinite(bound) & (bound > 0)
    if "bound_continuum" in table:
        ax.semilogy(t[positive], table["bound_continuum"][positive], "--", color="C1", lw=1.5,
                    label=r"continuum bound $2\tau C_{lo}/\kappa_t$ (math.md §5.3(c))")
    ax.semilogy(t[positive], bound[positive], "s--", color="C3", lw=2,
                label=r"checked bound $\theta_h\,2\tau C_{lo}/\kappa_t$ (discrete factor $\theta_h$)")
    if summary.get("predicted_rate") is not None:
        ax.axhline(summary["predicted_rate"], color="k", ls=":", lw=2,
                   label=f"predicted asymptotic rate {summary['predicted_rate']:.4g}")
    if summary.get("measured_rate") is not None:
        ax.axhline(summary["measured_rate"], color="C2", ls="-.", lw=1.5,
                   label=f"measured (fitted) rate {summary['measured_rate']:.4g}")
    failed = table["holds"] == 0
    if failed.any():
        ax.semilogy(t[failed], r[failed], "x", color="r", ms=10, mew=2, label="check fails")
    ax.set_xscale("symlog", linthresh=t[1] if t.size > 1 and t[1] > 0 else 1.0)
    ax.set_xlim(left=0.0)
    ax.set_xlabel("flow time t (snapshots)")
    ax.set_ylabel("rate (per unit time)")
    ax.set_title(f"{summary['model']}: local rate vs the LSI bound along the flow")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path / "rates.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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


def density(path: Path, summary: dict, solution: dict) -> Path:
    if solution["actions"].ndim == 2:
        return _density_2d(path, solution)
    times, states = solution["snapshots_t"], solution["states"]
    a, pi_star = solution["actions"], solution["pi_star"]
    shown, snaps = _shown_snapshots(solution)
    fig, axes = plt.subplots(2, len(shown), figsize=(5 * len(shown), 8), squeeze=False)
    # time axis: snapshot times are geometric, so draw rows between midpoints on a symlog axis
    edges = _edges(times)
    linthresh = times[1] if times.size > 1 and times[1] > 0 else 1.0
    vmax = max(float(np.max(snaps)), float(np.max(pi_star[shown])))
    for col, i in enumerate(shown):  # snaps[:, col] is state i
        top, bottom = axes[0, col], axes[1, col]
        mesh = top.pcolormesh(_edges(a), edges, snaps[:, col], shading="flat", cmap="viridis", vmin=0, vmax=vmax)
        top.set_yscale("symlog", linthresh=linthresh)
        top.set_xlabel("action a")
        top.set_ylabel("flow time t")
        top.set_title(f"state {_state_label(states, i)}: density p(t, a)")
        fig.colorbar(mesh, ax=top, label="policy density")
        colours = plt.cm.plasma(np.linspace(0, 0.9, min(6, times.size)))
        for colour, k in zip(colours, np.unique(np.linspace(0, times.size - 1, min(6, times.size)).astype(int))):
            bottom.plot(a, snaps[k, col], color=colour, lw=1.5, label=f"t = {times[k]:.3g}")
        bottom.plot(a, pi_star[i], "k--", lw=2, label=r"optimum $\pi^*$")
        bottom.set_xlabel("action a")
        bottom.set_ylabel("policy density")
        bottom.set_title(f"state {_state_label(states, i)}: snapshots and optimum")
        bottom.grid(True, alpha=0.3)
        bottom.legend(fontsize=8)
    fig.tight_layout()
    out = path / "density.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _shown_snapshots(solution: dict) -> tuple[list[int], np.ndarray]:
    """The states drawn in ``density.png`` and their snapshot policies ``(K, len(shown), M)``."""
    shown = shown_states(len(solution["states"]))
    return shown, solution["snapshots_pi"][:, snapshot_rows(solution["snapshot_states"], shown)]


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around sorted nodes ``x`` (midpoints inside, the end nodes outside)."""
    return np.concatenate([[x[0]], 0.5 * (x[1:] + x[:-1]), [x[-1]]])


def policy(path: Path, solution: dict) -> Path:
    if solution["actions"].ndim == 2:
        return _policy_2d(path, solution)
    a, states = solution["actions"], solution["states"]
    final, star = solution["pi_final"], solution["pi_star"]
    if len(states) == 1:
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
        # a 2D state grid is drawn against the state index (row-major order)
        y, ylabel = (states, "state s")
        if states.ndim == 2:
            y, ylabel = np.arange(len(states)), "state index (row-major grid)"
        vmax = float(max(final.max(), star.max()))
        for ax, data, title in ((axes[0], final, r"final policy $\pi_T(a\mid s)$"),
                                (axes[1], star, r"optimum $\pi^*(a\mid s)$")):
            mesh = ax.pcolormesh(a, y, data, shading="auto", cmap="viridis", vmin=0, vmax=vmax)
            fig.colorbar(mesh, ax=ax, label="policy density")
            ax.set_title(title)
        diff = np.abs(final - star)
        floor = max(float(diff.max()) * 1e-12, 1e-300)
        mesh = axes[2].pcolormesh(a, y, np.maximum(diff, floor), shading="auto", cmap="magma",
                                  norm=LogNorm(vmin=floor, vmax=max(float(diff.max()), 10 * floor)))
        fig.colorbar(mesh, ax=axes[2], label=r"$|\pi_T-\pi^*|$")
        axes[2].set_title(r"difference $|\pi_T-\pi^*|$")
        for ax in axes:
            ax.set_xlabel("action a")
            ax.set_ylabel(ylabel)
    fig.tight_layout()
    out = path / "policy.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _state_label(states: np.ndarray, i: int) -> str:
    s = np.atleast_1d(states[i])
    return "s = " + (f"{s[0]:.3g}" if s.size == 1 else "(" + ", ".join(f"{x:.3g}" for x in s) + ")")


def _contour(ax, a: np.ndarray, cells: np.ndarray, values: np.ndarray, levels: np.ndarray, cmap: str = "viridis",
             ylabel: bool = True):
    """Filled contours of the P1 field ``values`` on the triangles ``cells`` of the DOF coordinates ``a``."""
    filled = ax.tricontourf(a[:, 0], a[:, 1], cells, values, levels=levels, cmap=cmap, extend="both")
    ax.set_aspect("equal")
    ax.set_xlabel("action $a_1$")
    if ylabel:
        ax.set_ylabel("action $a_2$")
    return filled


def _colorbar(fig, filled, axes, label: str, ticks=None) -> None:
    lo, hi = filled.levels[0], filled.levels[-1]
    if ticks is None:  # round ticks inside the levels (outside, they would sit on the extension triangles)
        ticks = MaxNLocator(6).tick_values(lo, hi)
        ticks = ticks[(ticks >= lo) & (ticks <= hi)]
    fig.colorbar(filled, ax=axes, label=label, shrink=0.9, ticks=ticks, format="%.3g")


def _density_2d(path: Path, solution: dict) -> Path:
    """Filled contours of ``p(t, a)`` for up to three states (rows) at four snapshot times and ``pi*`` (columns)."""
    times, states = solution["snapshots_t"], solution["states"]
    a, cells, pi_star = solution["actions"], solution["cells"], solution["pi_star"]
    shown, snaps = _shown_snapshots(solution)
    picks = np.unique(np.linspace(0, times.size - 1, min(4, times.size)).round().astype(int))
    fig, axes = plt.subplots(len(shown), picks.size + 1, figsize=(3.2 * (picks.size + 1) + 1.2, 3.2 * len(shown)),
                             squeeze=False, layout="constrained")
    for r, (row, i) in enumerate(zip(axes, shown)):
        vmax = max(float(snaps[picks, r].max()), float(pi_star[i].max()))
        levels = np.linspace(0, vmax if vmax > 0 else 1.0, 21)  # one colour scale per state
        for col, (ax, k) in enumerate(zip(row, picks)):
            filled = _contour(ax, a, cells, snaps[k, r], levels, ylabel=col == 0)
            ax.set_title(f"{_state_label(states, i)}, t = {times[k]:.3g}", fontsize=10)
        _contour(row[-1], a, cells, pi_star[i], levels, ylabel=False)
        row[-1].set_title(rf"{_state_label(states, i)}: optimum $\pi^*$", fontsize=10)
        _colorbar(fig, filled, list(row), "policy density")
    out = path / "density.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _policy_2d(path: Path, solution: dict) -> Path:
    """Final policy and ``pi*`` at the middle state (shared colour scale) and their difference."""
    states, final, star = solution["states"], solution["pi_final"], solution["pi_star"]
    a, cells = solution["actions"], solution["cells"]
    i = len(states) // 2
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), layout="constrained")
    vmax = float(max(np.nanmax(final[i]), star[i].max()))
    levels = np.linspace(0, vmax if vmax > 0 else 1.0, 21)
    for ax, data, title in ((axes[0], final[i], r"final policy $\pi_T$"), (axes[1], star[i], r"optimum $\pi^*$")):
        filled = _contour(ax, a, cells, data, levels, ylabel=ax is axes[0])
        ax.set_title(f"{title} at {_state_label(states, i)}")
    _colorbar(fig, filled, list(axes[:2]), "policy density")
    diff = final[i] - star[i]
    bound = float(np.nanmax(np.abs(diff))) or 1.0
    filled = _contour(axes[2], a, cells, diff, np.linspace(-bound, bound, 21), cmap="RdBu_r", ylabel=False)
    axes[2].set_title(rf"difference $\pi_T-\pi^*$ (max $|\cdot|$ {bound:.2e})")
    _colorbar(fig, filled, axes[2], r"$\pi_T-\pi^*$", np.linspace(-bound, bound, 5))
    out = path / "policy.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
