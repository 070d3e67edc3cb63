"""Plots of a run directory, drawn from its files alone (so ``wpgflow plot RUN_DIR`` can redraw them).

Every figure's title names the run (model, flow kind, ``tau``, ``gamma``, ``dt``, grid) from ``config.toml`` and
``summary.json``; every axis is labelled.

* ``convergence.png``: (1) the gap ``J* - J`` (log scale) with the fitted linear rate (drawn only where
  ``summary["rate_status"]`` does not say the run is transient), the predicted asymptotic rate of the slowest
  mode and, where the summary has it, of the excited modes over the fitted span (``predicted_rate_excited``) and of
  the slowest excited mode (``slowest_excited_rate``, local-rate panel), and the exact
  OU gap for a Gaussian-started ``bandit`` (theory.md §7.3); (2) the discrete local rate
  ``-(log g_{n+k} - log g_n)/(t_{n+k} - t_n)``, which settles on the asymptotic rate; (3) the ratio of the
  measured ``(J_{n+1} - J_n)/dt`` to the predicted ``dJ/dt = rho^T (I - gamma P^pi)^{-1} D^h`` (theory.md §4),
  which tends to 1 at first order in ``dt``.
* ``density.png``: for up to three *distinct* states (states whose optimum and snapshots coincide are drawn once),
  the density ``p(t, a)`` as a smooth (Gouraud-shaded) heat map over action and log time with one shared colour
  bar, and six snapshots against ``pi*`` (dashed); for a Gaussian-started ``bandit`` the exact OU Gaussians
  (theory.md §7.3, :func:`solver.oracles.ou_moments`) are drawn on the snapshots.
* ``policy.png``: the final policy and ``pi*`` over ``(s, a)`` and ``|pi_T - pi*|`` on a log colour scale, titled
  with the maximum over all states.
* ``rates.png`` (Wasserstein runs, from ``rates.csv``): the local rate ``r(t)`` at the snapshots against each bound
  the file has (certified ``certified_bound``, the ``theta``-scaled ``bound``, the continuum ``bound_continuum``;
  read by column name, so older and newer files both draw), and the margins ``r(t) / bound``.
* ``sweep.png`` (:func:`plot_sweep`, from ``sweep.csv``): measured and predicted rates against the swept value, the
  relative error of the measured rate, and, for a ``mdp.tau`` sweep of a barrier model, the Arrhenius plot with
  the fitted barrier and the Eyring-Kramers rate (theory.md §5.4).

For 2D actions (``solution["actions"]`` of shape ``(M, 2)`` with ``cells``) density and policy are filled
contours on the action mesh: ``density.png`` shows up to three states (rows) at six positive snapshot times and
``pi*`` (columns), one colour bar per state from 0 to the state's maximum (no extension arrows: the density lies
inside); ``policy.png`` the final policy, ``pi*`` and their difference at the state where ``|pi_T - pi*|`` is
largest.

Every figure goes through :func:`save_figure` (tests wrap it to inspect the figure with matplotlib's API).
"""

from __future__ import annotations

import csv
import math
import tomllib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from .. import oracles  # noqa: E402
from ..outputs import read_run, shown_states, snapshot_rows  # noqa: E402

#: Models whose action reward is a double well with barrier ``depth`` (Arrhenius panel of ``sweep.png``).
BARRIER_MODELS = ("double_well", "double_well_bandit")

#: Relative round-off of ``J`` (theory.md §8.6: the floor of ``J* - J`` is ~1e-13 |J|); differences of ``J`` below
#: ``ROUNDOFF * max|J|`` are noise and are not drawn as rates or ratios.
ROUNDOFF = 1e-13


def save_figure(fig, out: Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``out`` and close it (the one place figures are saved)."""
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def plot_run(path: Path) -> list[Path]:
    """Draw all plots of the run in ``path``; return the files written."""
    path = Path(path)
    summary, history, solution = read_run(path)
    cfg = run_config(path)
    written = [convergence(path, summary, history, cfg), density(path, summary, solution, cfg),
               policy(path, summary, solution, cfg)]
    del solution  # (N, M) tables: not needed by rates.png
    rates_file = rates(path, summary, cfg)
    written += [f for f in (plot_regularity(path),) if f]  # regularity.png (hypotheses.csv)
    return written + ([rates_file] if rates_file else [])


# --- shared pieces --------------------------------------------------------------------------------------------

def run_config(path: Path) -> dict:
    """The raw ``config.toml`` of a run directory as a dict (``{}`` if it is missing or unreadable)."""
    try:
        return tomllib.loads((Path(path) / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def run_title(summary: dict, cfg: dict) -> str:
    """``"lqr (wasserstein): tau = 1, gamma = 0.9, dt = 0.01, 121 states x 257 action DOFs"``."""
    mdp, flow = cfg.get("mdp", {}), cfg.get("flow", {})
    kind = flow.get("kind", "wasserstein")
    if kind == "policy_iteration":
        step = "one iteration per unit t"
    elif flow.get("adaptive"):
        step = f"adaptive $\\Delta t$ (tol {flow.get('adapt_tol', 1e-3):g})"
    else:
        step = f"$\\Delta t$ = {flow.get('dt', float('nan')):g}"
    parts = [f"$\\tau$ = {mdp['tau']:g}" if "tau" in mdp else None,
             f"$\\gamma$ = {mdp['gamma']:g}" if "gamma" in mdp else None, step,
             ("one state" if summary.get("n_states") == 1 else f"{summary.get('n_states', '?')} states") +
             f" $\\times$ {summary.get('n_action_dofs', '?')} action DOFs"]
    return f"{summary.get('model', mdp.get('model', '?'))} ({kind}): " + ", ".join(p for p in parts if p)


def time_label(t: float) -> str:
    """A flow time with three significant digits, the same precision for every time (``0`` stays ``0``)."""
    return "0" if t == 0 else f"{t:#.3g}".rstrip(".")


def state_label(states: np.ndarray, i: int) -> str:
    """``"s = -3"`` or ``"s = (1, -2)"`` for state ``i`` of the grid ``states``."""
    s = np.atleast_1d(states[i])
    return "s = " + (f"{s[0]:.3g}" if s.size == 1 else "(" + ", ".join(f"{x:.3g}" for x in s) + ")")


def plain_log_axis(axis) -> None:
    """Tick labels of a log axis as plain numbers (``0.5``, ``2``, ``1e-08``), never ``2.25x10^0``.

    Minor ticks are labelled only when the axis spans less than a decade (else they would crowd).
    """
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lo, hi = sorted(axis.get_view_interval())
    if lo > 0 and hi / lo < 10:
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    else:
        axis.set_minor_formatter(NullFormatter())


def rate_scale(ax, values) -> None:
    """A y axis for rates: linear if the positive finite ``values`` span less than a factor 10, else log."""
    v = np.asarray([x for x in np.ravel(values) if x is not None and np.isfinite(x) and x > 0], float)
    if v.size and v.max() / v.min() >= 10:
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
    else:
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)


def distinct_columns(pi_star: np.ndarray, snaps: np.ndarray, shown: list[int]) -> list[int]:
    """Columns of ``shown`` whose optimum and snapshot policies differ from every earlier column's.

    Two states count as the same if their ``pi*`` and all their snapshots agree to 1e-9 of the largest density
    (for example every state of a model whose action does not move the state).
    """
    scale = max(float(np.max(pi_star[shown])), 1e-300)
    keep: list[int] = []
    for col, i in enumerate(shown):
        same = any(np.max(np.abs(pi_star[i] - pi_star[shown[k]])) <= 1e-9 * scale
                   and np.max(np.abs(snaps[:, col] - snaps[:, k])) <= 1e-9 * scale for k in keep)
        if not same:
            keep.append(col)
    return keep


def shown_snapshots(solution: dict) -> tuple[list[int], np.ndarray]:
    """The states drawn in ``density.png`` and their snapshot policies ``(K, len(shown), M)``."""
    shown = shown_states(len(solution["states"]))
    return shown, solution["snapshots_pi"][:, snapshot_rows(solution["snapshot_states"], shown)]


def snapshot_picks(times: np.ndarray, count: int, positive: bool = False) -> np.ndarray:
    """Indices of ``count`` snapshots spread evenly in log time (``t = 0`` first unless ``positive``)."""
    idx = np.arange(times.size)
    pos = idx[times > 0]
    if pos.size == 0:
        return idx[:1]
    n = max(min(count - (0 if positive else 1), pos.size), 1)
    # the snapshots are log-spaced in time (observers.Schedule): evenly spaced indices are evenly spaced in log t
    picks = {int(pos[k]) for k in np.round(np.linspace(0, pos.size - 1, n)).astype(int)}
    if not positive and times[0] == 0:
        picks.add(0)
    return np.array(sorted(picks))


def ou_exact(summary: dict, cfg: dict):
    """``(mean, var)`` as a function of ``t`` for a Gaussian-started 1D ``bandit`` run (theory.md §7.3), else None."""
    mdp, flow, actions = cfg.get("mdp", {}), cfg.get("flow", {}), cfg.get("actions", {})
    params = mdp.get("params", {})
    if (summary.get("model") != "bandit" or flow.get("init") != "gaussian" or flow.get("kind", "wasserstein")
            != "wasserstein" or actions.get("reference", "lebesgue") != "lebesgue"
            or not isinstance(params.get("center", 0.0), (int, float))):
        return None
    k, center, tau = float(params.get("k", 1.0)), float(params.get("center", 0.0)), float(mdp["tau"])
    m0, v0 = float(flow.get("init_mean", 0.0)), float(flow.get("init_std", 1.0)) ** 2
    return lambda t: oracles.ou_moments(float(t), k, center, tau, m0, v0)


def gaussian(a: np.ndarray, mean: float, var: float) -> np.ndarray:
    return np.exp(-0.5 * (a - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


# --- convergence.png ------------------------------------------------------------------------------------------

def local_rates(t: np.ndarray, gap: np.ndarray, J_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The discrete local rate ``-(log g_{n+k} - log g_n) / (t_{n+k} - t_n)`` at the midpoints, lag ``k`` rows.

    ``k`` is about 1/200 of the run (at least one step); gaps below ``1e2 ROUNDOFF J_scale`` are left out.
    """
    ok = np.isfinite(gap) & (gap > 1e2 * ROUNDOFF * J_scale)
    t, gap = t[ok], gap[ok]
    if t.size < 3:
        return np.zeros(0), np.zeros(0)
    k = max(1, t.size // 200)
    dt = t[k:] - t[:-k]
    rate = -(np.log(gap[k:]) - np.log(gap[:-k])) / np.where(dt > 0, dt, np.nan)
    return 0.5 * (t[k:] + t[:-k]), rate


def convergence(path: Path, summary: dict, history: dict, cfg: dict | None = None) -> Path:
    """``convergence.png``: gap, local rate, and measured / predicted ``dJ/dt`` (module docstring)."""
    cfg = cfg if cfg is not None else run_config(path)
    t, gap, J = history["t"], history["gap"], history["J"]
    J_scale = max(1.0, abs(float(summary.get("J_star") or 0.0)))  # the round-off of J* - J is ~1e-13 |J*|
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5), layout="constrained")
    fig.suptitle(run_title(summary, cfg), fontsize=12)
    positive = np.isfinite(gap) & (gap > 0)
    ax1.semilogy(t[positive], gap[positive], color="C0", lw=2, label=r"$J^*-J(t)$")
    status = summary.get("rate_status")  # "asymptotic" / "transient" (issue 11); missing: not assessed
    transient = isinstance(status, str) and status.lower().startswith("transient")
    rate, predicted, excited = summary.get("rate"), summary.get("predicted_rate"), summary.get("predicted_rate_excited")
    notes = []
    if rate is not None and summary.get("rate_t_range") and not transient:
        lo, hi = summary["rate_t_range"]
        tt = np.linspace(lo, hi, 50)
        g0 = np.interp(lo, t, gap)  # anchored at the fit window's first point
        r2 = summary.get("rate_r2")
        r2_text = "" if r2 is None else (f", $1-r^2$ = {1 - r2:.1e}" if r2 > 0.999 else f", $r^2$ = {r2:.4f}")
        verdict = "" if status is None else f", {status}"
        ax1.semilogy(tt, g0 * np.exp(-rate * (tt - lo)), "--", color="C3", lw=2,
                     label=f"fit: rate {rate:.5g}{r2_text}{verdict}")
    elif rate is not None and transient:
        last = summary.get("rate_local_last")
        verdict = summary.get("rate_verdict")
        notes.append("transient: the local rate has not settled over the fit window, so no fitted line\n"
                     f"(least-squares slope {rate:.4g}" + (f", last local rate {last:.4g}" if last is not None else "")
                     + ")" + (f"; verdict: {verdict}" if verdict and verdict != status else ""))
    if (status is None and excited is None and rate is not None and predicted
            and abs(rate / predicted - 1) > 0.05):
        notes.append(f"fit {rate:.4g} is {100 * (rate / predicted - 1):+.0f}% off the slowest-mode prediction; this "
                     "summary has no\nrate_status / predicted_rate_excited to say whether the fit is asymptotic")
    end = t[positive][-1] if positive.any() else (t[-1] if t.size else 0.0)
    g_end = gap[positive][-1] if positive.any() else 1.0
    tt = np.linspace(0.5 * end, end, 20)
    if predicted is not None:
        ax1.semilogy(tt, g_end * np.exp(-predicted * (tt - end)), ":", color="k", lw=2,
                     label=f"predicted, slowest mode: {predicted:.5g}")
    span = summary.get("modes_span")
    slow_excited = summary.get("slowest_excited_rate")
    if excited is not None and (predicted is None or abs(excited - predicted) > 1e-3 * abs(predicted)):
        if span:  # the excited modes' prediction over the fitted span, anchored at its start
            ts = np.linspace(span[0], span[1], 50)
            ax1.semilogy(ts, np.interp(span[0], t, gap) * np.exp(-excited * (ts - span[0])), "-.", color="C2",
                         lw=2, label=f"predicted, excited modes over the fit span: {excited:.5g}")
        else:
            ax1.semilogy(tt, g_end * np.exp(-excited * (tt - end)), "-.", color="C2", lw=2,
                         label=f"predicted, excited modes at the end: {excited:.5g}")
        if predicted is not None and slow_excited is not None and abs(slow_excited / predicted - 1) > 1e-3:
            notes.append(f"the slowest mode (rate {predicted:.3g}) is not excited by the start;\n"
                         f"the gap decays at the excited modes' rate {excited:.3g}")
        elif predicted is not None:
            notes.append(f"the slowest mode (rate {predicted:.3g}) is excited but still small;\n"
                         f"over the fit span the excited modes give {excited:.3g}")
    exact = ou_exact(summary, cfg)
    if exact is not None and "gamma" in cfg.get("mdp", {}):
        p = cfg["mdp"].get("params", {})
        k, c, tau, g = float(p.get("k", 1.0)), float(p.get("center", 0.0)), cfg["mdp"]["tau"], cfg["mdp"]["gamma"]
        te = t[positive]
        ax1.semilogy(te, [oracles.ou_gap(*exact(x), k, c, tau, g) for x in te], ls=(0, (1, 3)), color="C1", lw=1.5,
                     label="exact OU gap (theory.md §7.3)")
    if notes:
        ax1.text(0.98, 0.80, "\n".join(notes), transform=ax1.transAxes, fontsize=7.5, va="top", ha="right",
                 bbox=dict(boxstyle="round", fc="w", ec="0.7", alpha=0.9))
    ax1.set_xlabel("flow time t")
    ax1.set_ylabel(r"gap $J^*-J(t)$")
    ax1.set_title("convergence of the gap")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8, loc="upper right")

    tm, r = local_rates(t, gap, J_scale)
    ax2.plot(tm, r, color="C0", lw=1.5, label=r"local rate $-\Delta\log(J^*-J)/\Delta t$")
    refs = list(r[np.isfinite(r)][-max(1, r.size // 2):]) if r.size else []
    if predicted is not None:
        ax2.axhline(predicted, color="k", ls=":", lw=2, label=f"predicted, slowest mode {predicted:.5g}")
        refs.append(predicted)
    if excited is not None and (predicted is None or abs(excited - predicted) > 1e-3 * abs(predicted)):
        ax2.axhline(excited, color="C2", ls="-.", lw=2, label=f"predicted, excited modes {excited:.5g}")
        refs.append(excited)
    if (slow_excited is not None and abs(slow_excited - (excited or slow_excited)) > 1e-2 * abs(slow_excited)
            and (predicted is None or abs(slow_excited - predicted) > 1e-3 * abs(predicted))):
        ax2.axhline(slow_excited, color="C4", ls="--", lw=1.2, label=f"slowest excited mode {slow_excited:.5g}")
    if rate is not None and summary.get("rate_t_range") and not transient:
        lo, hi = summary["rate_t_range"]
        ax2.plot([lo, hi], [rate, rate], "--", color="C3", lw=2, label=f"fit {rate:.5g} over its window")
        refs.append(rate)
    if refs:
        lo_r, hi_r = float(np.min(refs)), float(np.max(refs))
        pad = 0.15 * max(hi_r - lo_r, 0.05 * abs(hi_r))
        ax2.set_ylim(lo_r - pad, hi_r + pad)
    ax2.set_xlabel("flow time t")
    ax2.set_ylabel("rate (per unit time)")
    ax2.set_title("local rate of the gap: settled = asymptotic")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)

    ratio = history["dissipation_ratio"]
    dJ = np.abs(np.diff(J, prepend=np.nan))
    ok = np.isfinite(ratio) & (dJ > 1e2 * ROUNDOFF * J_scale)  # ratio noise ROUNDOFF J_scale / dJ <= 1%
    if ok.any():
        ax3.plot(t[ok], ratio[ok], color="C0", lw=1.5,
                 label=r"measured $(J_{n+1}-J_n)/\Delta t$ / predicted $\rho^\top(I-\gamma P^\pi)^{-1}D^h$")
        ax3.axhline(1.0, color="k", ls=":", lw=1.5, label="1 (exact in time)")
        q = np.quantile(ratio[ok], [0.02, 0.98])
        pad = 0.1 * max(q[1] - q[0], 1e-3)
        ax3.set_ylim(min(q[0], 1.0) - pad, max(q[1], 1.0) + pad)
        ax3.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax3.legend(fontsize=9)
    else:
        ax3.text(0.5, 0.5, "no predicted dJ/dt for this flow kind", transform=ax3.transAxes, ha="center")
    ax3.set_xlabel("flow time t")
    ax3.set_ylabel("measured / predicted dJ/dt")
    ax3.set_title(r"energy dissipation identity (theory.md §4); $\to 1$ as $\Delta t\to 0$")
    ax3.grid(True, alpha=0.3)
    return save_figure(fig, path / "convergence.png", dpi=100)


# --- density.png ----------------------------------------------------------------------------------------------

def density(path: Path, summary: dict, solution: dict, cfg: dict | None = None) -> Path:
    """``density.png`` (module docstring)."""
    cfg = cfg if cfg is not None else run_config(path)
    if solution["actions"].ndim == 2:
        return _density_2d(path, summary, solution, cfg)
    times, states = solution["snapshots_t"], solution["states"]
    a, pi_star = solution["actions"], solution["pi_star"]
    shown, snaps = shown_snapshots(solution)
    cols = distinct_columns(pi_star, snaps, shown)
    same_note = ""
    if len(cols) < len(shown):
        others = [state_label(states, shown[c])[4:] for c in range(len(shown)) if c not in cols]
        same_note = f" (identical at s = {', '.join(others)})"
    fig, axes = plt.subplots(2, len(cols), figsize=(max(5.2 * len(cols) + 1.5, 9.5), 8.5), squeeze=False,
                             layout="constrained")
    fig.suptitle(run_title(summary, cfg), fontsize=12)
    vmax = max(float(np.max(snaps[:, cols])), float(np.max(pi_star[[shown[c] for c in cols]])))
    linthresh = times[1] if times.size > 1 and times[1] > 0 else 1.0
    picks = snapshot_picks(times, 6)
    colours = plt.cm.plasma(np.linspace(0, 0.85, picks.size))
    exact = ou_exact(summary, cfg)
    mesh = None
    for n, col in enumerate(cols):
        i = shown[col]
        top, bottom = axes[0, n], axes[1, n]
        if times.size > 1:  # Gouraud shading: smooth in a and between the log-spaced snapshot rows
            mesh = top.pcolormesh(a, times, snaps[:, col], shading="gouraud", cmap="viridis", vmin=0, vmax=vmax)
            top.set_yscale("symlog", linthresh=linthresh)
            top.set_ylim(0, times[-1])
        else:
            top.plot(a, snaps[0, col])
        top.set_xlabel("action a")
        top.set_ylabel("flow time t (symlog scale)")
        top.set_title(f"{state_label(states, i)}{same_note}: density $p(t, a)$")
        for colour, k in zip(colours, picks):
            bottom.plot(a, snaps[k, col], color=colour, lw=1.6, label=f"t = {time_label(times[k])}")
            if exact is not None and times[k] > 0:
                m, v = exact(times[k])
                bottom.plot(a, gaussian(a, m, v), color="k", lw=0.8, ls=(0, (1, 2)),
                            label="exact OU Gaussian" if k == picks[-1] else None)
        bottom.plot(a, pi_star[i], "k--", lw=2, label=r"optimum $\pi^*$")
        bottom.set_xlabel("action a")
        bottom.set_ylabel("policy density")
        bottom.set_title(f"{state_label(states, i)}: snapshots and optimum")
        bottom.grid(True, alpha=0.3)
        bottom.legend(fontsize=8)
    if mesh is not None:
        fig.colorbar(mesh, ax=list(axes[0]), label="policy density p(t, a)", shrink=0.9)
    return save_figure(fig, path / "density.png", dpi=100)


def density_levels(vmax: float, count: int = 24) -> np.ndarray:
    """Contour levels ``vmax (k / count)^2`` from 0 to ``vmax``: quadratic spacing, so a spread-out density (the
    uniform start: 1/|A| against a peak of ``vmax``) falls a few levels above 0 instead of in the lowest colour."""
    return (vmax if vmax > 0 else 1.0) * np.linspace(0.0, 1.0, count + 1) ** 2


def _contour(ax, a: np.ndarray, cells: np.ndarray, values: np.ndarray, levels: np.ndarray, cmap: str = "viridis"):
    """Filled contours of the P1 field ``values`` on the triangles ``cells``; values are clipped into the levels,
    so the colour bar needs no extension arrows."""
    filled = ax.tricontourf(a[:, 0], a[:, 1], cells, np.clip(values, levels[0], levels[-1]), levels=levels,
                            cmap=cmap)
    ax.set_aspect("equal")
    ax.set_xlabel("action $a_1$")
    ax.set_ylabel("action $a_2$")
    return filled


def _colorbar(fig, filled, axes, label: str, ticks=None) -> None:
    lo, hi = filled.levels[0], filled.levels[-1]
    if ticks is None:
        ticks = MaxNLocator(5).tick_values(lo, hi)
        ticks = ticks[(ticks >= lo - 1e-12 * abs(hi)) & (ticks <= hi * (1 + 1e-12))]
    # uniform spacing: each contour level gets the same length of the bar (a square-root scale for density_levels)
    fig.colorbar(filled, ax=axes, label=label, shrink=0.9, ticks=ticks, format="%.3g", spacing="uniform")


def _density_2d(path: Path, summary: dict, solution: dict, cfg: dict) -> Path:
    """Filled contours of ``p(t, a)`` for up to three distinct states (rows) at six positive times and ``pi*``."""
    times, states = solution["snapshots_t"], solution["states"]
    a, cells, pi_star = solution["actions"], solution["cells"], solution["pi_star"]
    shown, snaps = shown_snapshots(solution)
    cols = distinct_columns(pi_star, snaps, shown)
    picks = snapshot_picks(times, 6, positive=True)
    fig, axes = plt.subplots(len(cols), picks.size + 1, figsize=(2.7 * (picks.size + 1) + 1.5, 2.9 * len(cols) + 0.6),
                             squeeze=False, layout="constrained")
    fig.suptitle(run_title(summary, cfg), fontsize=12)
    for row, col in zip(axes, cols):
        i = shown[col]
        vmax = max(float(snaps[picks, col].max()), float(pi_star[i].max()))
        levels = density_levels(vmax)  # one colour scale per state
        for ax, k in zip(row, picks):
            filled = _contour(ax, a, cells, snaps[k, col], levels)
            ax.set_title(f"{state_label(states, i)}, t = {time_label(times[k])}", fontsize=9)
        _contour(row[-1], a, cells, pi_star[i], levels)
        row[-1].set_title(rf"{state_label(states, i)}: optimum $\pi^*$", fontsize=9)
        _colorbar(fig, filled, list(row), "policy density")
    return save_figure(fig, path / "density.png", dpi=90)


# --- policy.png -----------------------------------------------------------------------------------------------

def policy(path: Path, summary: dict, solution: dict, cfg: dict | None = None) -> Path:
    """``policy.png`` (module docstring)."""
    cfg = cfg if cfg is not None else run_config(path)
    if solution["actions"].ndim == 2:
        return _policy_2d(path, summary, solution, cfg)
    a, states = solution["actions"], solution["states"]
    final, star = solution["pi_final"], solution["pi_star"]
    diff = np.abs(final - star)
    worst = float(np.nanmax(diff)) if np.isfinite(diff).any() else math.nan
    if len(states) == 1:
        fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
        ax.plot(a, final[0], lw=2, label=r"final policy $\pi_T$")
        ax.plot(a, star[0], "k--", lw=2, label=r"optimum $\pi^*$")
        ax.set_xlabel("action a")
        ax.set_ylabel("policy density")
        ax.set_title(f"final policy vs optimum: max $|\\pi_T-\\pi^*|$ = {worst:.2e}")
        ax.grid(True, alpha=0.3)
        ax.legend()
    else:
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), layout="constrained")
        # a 2D state grid is drawn against the state index (row-major order)
        y, ylabel = (states, "state s")
        if states.ndim == 2:
            y, ylabel = np.arange(len(states)), "state index (row-major grid)"
        vmax = float(max(np.nanmax(final), star.max()))
        for ax, data, title in ((axes[0], final, r"final policy $\pi_T(a\mid s)$"),
                                (axes[1], star, r"optimum $\pi^*(a\mid s)$")):
            mesh = ax.pcolormesh(a, y, data, shading="gouraud", cmap="viridis", vmin=0, vmax=vmax)
            ax.set_title(title)
        fig.colorbar(mesh, ax=list(axes[:2]), label="policy density", shrink=0.9)
        top = worst if np.isfinite(worst) and worst > 0 else 1.0
        floor = max(top * 1e-12, 1e-300)
        mesh = axes[2].pcolormesh(a, y, np.maximum(diff, floor), shading="auto", cmap="magma",
                                  norm=LogNorm(vmin=floor, vmax=max(top, 10 * floor)))
        fig.colorbar(mesh, ax=axes[2], label=r"$|\pi_T-\pi^*|$")
        axes[2].set_title(rf"$|\pi_T-\pi^*|$: max over all states {worst:.2e}")
        for ax in axes:
            ax.set_xlabel("action a")
            ax.set_ylabel(ylabel)
        fig.suptitle(run_title(summary, cfg), fontsize=12)
    return save_figure(fig, path / "policy.png", dpi=100)


def _policy_2d(path: Path, summary: dict, solution: dict, cfg: dict) -> Path:
    """Final policy, ``pi*`` and their difference at the state where ``max_a |pi_T - pi*|`` is largest."""
    states, final, star = solution["states"], solution["pi_final"], solution["pi_star"]
    a, cells = solution["actions"], solution["cells"]
    per_state = np.nanmax(np.abs(final - star), axis=1)
    i = int(np.nanargmax(per_state)) if np.isfinite(per_state).any() else len(states) // 2
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), layout="constrained")
    fig.suptitle(f"{run_title(summary, cfg)}\nmax over all {len(states)} states of $|\\pi_T-\\pi^*|$ = "
                 f"{per_state[i]:.2e}, at {state_label(states, i)} (drawn)", fontsize=11)
    vmax = float(max(np.nanmax(final[i]), star[i].max()))
    levels = density_levels(vmax)
    for ax, data, title in ((axes[0], final[i], r"final policy $\pi_T$"), (axes[1], star[i], r"optimum $\pi^*$")):
        filled = _contour(ax, a, cells, data, levels)
        ax.set_title(f"{title} at {state_label(states, i)}", fontsize=10)
    _colorbar(fig, filled, list(axes[:2]), "policy density")
    diff = final[i] - star[i]
    bound = float(np.nanmax(np.abs(diff))) or 1.0
    filled = _contour(axes[2], a, cells, diff, np.linspace(-bound, bound, 21), cmap="RdBu_r")
    axes[2].set_title(rf"difference $\pi_T-\pi^*$ at {state_label(states, i)}", fontsize=10)
    _colorbar(fig, filled, axes[2], r"$\pi_T-\pi^*$", np.linspace(-bound, bound, 5))
    return save_figure(fig, path / "policy.png", dpi=90)


# --- rates.png ------------------------------------------------------------------------------------------------

def read_table(file: Path) -> dict[str, np.ndarray] | None:
    """Every column of a CSV file as floats (``True``/``False`` as 1/0, empty or text as NaN); None if absent."""
    if not Path(file).exists():
        return None
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))

    def number(text):
        if text in ("True", "true"):
            return 1.0
        if text in ("False", "false"):
            return 0.0
        try:
            return float(text)
        except (TypeError, ValueError):
            return math.nan

    names = list(rows[0].keys()) if rows else []
    return {c: np.array([number(r[c]) for r in rows]) for c in names}


#: The bounds ``rates.png`` draws when ``rates.csv`` has their column: (column, style, label).
RATE_BOUNDS = (
    ("certified_bound", dict(marker="s", color="C3", ls="--", lw=2, ms=6),
     r"certified bound (discrete generator, theory.md §10.1)"),
    ("bound_continuum", dict(marker="^", color="C1", ls=":", lw=1.5, ms=8, mfc="none", mew=1.5),
     r"continuum bound $2\tau C_{lo}/\kappa_t$ (theory.md §5.3(c))"),
)


def rates(path: Path, summary: dict, cfg: dict | None = None) -> Path | None:
    """``rates.png`` from ``rates.csv`` (theory.md §5.3(c)); None if the run has no ``rates.csv``.

    Left: ``r(t)`` and every bound column the file has (each with its own marker, drawn above the others so a
    bound equal to another stays visible), the predicted and fitted rates; linear y axis unless the values span
    a factor 10. Right: the margins ``r(t) / bound`` (log scale; >= 1 where the inequality holds).
    """
    cfg = cfg if cfg is not None else run_config(path)
    table = read_table(Path(path) / "rates.csv")
    if table is None or "t" not in table or "local_rate" not in table or table["t"].size == 0:
        return None
    t, r = table["t"], table["local_rate"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 5.2), layout="constrained", width_ratios=(1.25, 1))
    fig.suptitle(run_title(summary, cfg), fontsize=12)
    ok = np.isfinite(r) & (r > 0)
    ax.plot(t[ok], r[ok], "o-", color="C0", lw=2, ms=5, label=r"local rate $r(t)=\dot J/(J^*-J)$", zorder=2)
    shown = list(r[ok])
    drawn = []
    for z, (column, style, label) in enumerate(RATE_BOUNDS):
        if column not in table:
            continue
        b = table[column]
        good = np.isfinite(b) & (b > 0)
        if good.any():
            ax.plot(t[good], b[good], label=label, zorder=3 + z, **style)
            shown += list(b[good])
            drawn.append((column, style, label, good))
    for key, style, text in (("predicted_rate", dict(color="k", ls=":", lw=2), "predicted asymptotic rate"),
                             ("predicted_rate_excited", dict(color="C2", ls="-.", lw=1.5), "predicted, excited modes"),
                             ("measured_rate", dict(color="C5", ls="-.", lw=1.5), "measured (fitted) rate")):
        value = summary.get(key)
        if key == "measured_rate" and summary.get("rate_status"):
            text = f"measured (fitted, {summary['rate_status']}) rate"
        if value is not None and np.isfinite(value):
            ax.axhline(value, label=f"{text} {value:.5g}", **style)
            shown.append(value)
    for column, style, text in (("certified_holds" if "certified_holds" in table else "holds",
                                 dict(marker="x", color="r", ms=11, mew=2), "reported check fails"),
                                ("continuum_holds", dict(marker="+", color="C1", ms=12, mew=2),
                                 "continuum check fails (not a bound for the discrete flow)")):
        failed = table[column] == 0 if column in table else np.zeros(t.size, bool)
        if failed.any():
            ax.plot(t[failed], r[failed], ls="none", label=text, zorder=9, **style)
    rate_scale(ax, shown)
    ax.set_ylabel("rate (per unit time)")
    ax.set_title("local rate against the rate bounds along the flow")
    ax.legend(fontsize=8)
    below_one = False
    excess = []  # r / bound - 1 on a symlog axis: a shortfall of 2e-4 shows as clearly as a margin of 100
    for column, style, label, good in drawn:
        margin = r / np.where(table[column] > 0, table[column], np.nan) - 1
        m_ok = good & ok & np.isfinite(margin)
        if m_ok.any():
            ax2.plot(t[m_ok], margin[m_ok], label=f"$r(t)$ / {column} $-$ 1", **style)
            excess += list(np.abs(margin[m_ok]))
            below_one = below_one or bool(np.any(margin[m_ok] < 0))
    ax2.axhline(0.0, color="k", lw=1, label="0: the bound is attained")
    small = [x for x in excess if x > 0]
    linthresh = 10.0 ** np.clip(np.floor(np.log10(min(small))), -8, -2) if small else 1e-3
    ax2.set_yscale("symlog", linthresh=linthresh)
    if excess:
        ax2.set_ylim(top=3 * max(max(excess), linthresh))  # headroom above the largest margin
    if not below_one:
        ax2.set_ylim(bottom=0.0)  # every margin >= 1: no empty negative half
    ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.yaxis.set_minor_formatter(NullFormatter())
    linthresh = t[1] if t.size > 1 and t[1] > 0 else 1.0
    for axis in (ax, ax2):
        axis.set_xscale("symlog", linthresh=linthresh)
        axis.set_xlim(0.0, max(float(t[-1]), linthresh))
        axis.set_xlabel("flow time t (snapshots; log scale above the first)")
        axis.grid(True, which="major", alpha=0.3)
    verdicts = [f"{k} = {summary[k]:.4g}" if isinstance(summary[k], float) else f"{k} = {summary[k]}"
                for k in ("certified_margin", "local_rate_check", "certified_status") if summary.get(k) is not None]
    ax2.set_title("margin r(t) / bound $-$ 1 (>= 0: the inequality holds; symlog scale)"
                  + ("\n" + ", ".join(verdicts) if verdicts else ""), fontsize=10)
    ax2.set_ylabel("r(t) / bound $-$ 1")
    ax2.legend(fontsize=8, loc="lower left")
    return save_figure(fig, Path(path) / "rates.png", dpi=100)


# --- sweep.png ------------------------------------------------------------------------------------------------

#: Axis labels of common swept keys (others are labelled with the key itself).
PARAM_LABELS = {"mdp.tau": r"temperature $\tau$", "mdp.gamma": r"discount $\gamma$", "flow.dt": r"time step $\Delta t$",
                "actions.cells": "action cells", "states.n": "number of states"}


def eyring_kramers(tau: np.ndarray, depth: float, width: float, dt: float | None = None) -> np.ndarray:
    """Eyring-Kramers WPG rate of ``r = -depth ((a/width)^2 - 1)^2`` (theory.md §5.4): ``2 ell`` with
    ``ell = tau lambda_P ~ (1/pi) sqrt(|Q''_+| |Q''_0|) e^{-depth/tau}``
    ``= (4 sqrt 2 / pi)(depth/width^2) e^{-depth/tau}``;
    for implicit Euler with step ``dt`` the rate ``2 log(1 + dt ell)/dt``."""
    ell = 4 * math.sqrt(2) / math.pi * depth / width ** 2 * np.exp(-depth / np.asarray(tau, float))
    return 2 * ell if dt is None else 2 * np.log1p(dt * ell) / dt


def plot_sweep(out: Path, rows: list[dict]) -> Path:
    """``out/sweep.png`` from the rows of ``sweep.csv`` (as :func:`solver.sweep.read_csv` returns them) and the run
    directories' ``config.toml``.

    Panels: (1) measured rate (open circles) and predicted rate (crosses) per kind against the swept value (log
    axes when the values are positive and span more than a factor 4); (2) the relative error
    ``measured / predicted - 1`` per kind; (3) only for a ``mdp.tau`` sweep of a barrier model
    (:data:`BARRIER_MODELS`): ``log rate`` against ``1/tau`` with the least-squares Arrhenius line of the WPG runs
    (slope = minus the fitted barrier) and the Eyring-Kramers rate of theory.md §5.4 for the reward's barrier.
    """
    out = Path(out)
    param = rows[0]["param"] if rows else "value"
    cfg = run_config(out / rows[0]["run_dir"]) if rows and rows[0].get("run_dir") else {}
    model = cfg.get("mdp", {}).get("model")
    params = cfg.get("mdp", {}).get("params", {})
    arrhenius = (param == "mdp.tau" and model in BARRIER_MODELS and rows and all(r["value"] > 0 for r in rows))
    n_panels = 3 if arrhenius else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(6.2 * n_panels, 5.2), layout="constrained")
    xlabel = PARAM_LABELS.get(param, param)
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig.suptitle(f"sweep of {param}" + (f" on {model}" if model else "") + f": {len(rows)} runs, kinds "
                 + ", ".join(kinds), fontsize=12)
    ax, err = axes[0], axes[1]
    xs, ys = [], []
    for colour, kind in enumerate(kinds):
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["value"])
        for column, style, label in (("measured_rate", "o-", "measured (fit)"),
                                     ("predicted_rate", "x--", "predicted (theory)")):
            pts = [(r["value"], r[column]) for r in mine if r.get(column) is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, style, color=f"C{colour}", lw=1.5, ms=7,
                        mfc="none" if column == "measured_rate" else None, label=f"{kind}: {label}")
                xs += list(x)
                ys += list(y)
        pts = [(r["value"], r["measured_rate"] / r["predicted_rate"] - 1) for r in mine
               if r.get("measured_rate") is not None and r.get("predicted_rate")]
        if pts:
            x, y = zip(*pts)
            err.plot(x, 100 * np.array(y), "o-", color=f"C{colour}", mfc="none", label=kind)
    for axis in (ax, err):
        if xs and min(xs) > 0 and max(xs) > 4 * min(xs):
            axis.set_xscale("log")
            plain_log_axis(axis.xaxis)
        if xs:
            axis.set_xticks(sorted(set(xs)))
            axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel(xlabel)
        axis.grid(True, which="both", alpha=0.3)
    if ys and min(ys) > 0 and max(ys) > 4 * min(ys):
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
    ax.set_ylabel(r"asymptotic rate of $J^*-J(t)$")
    ax.set_title(f"gap rate vs {xlabel}: measured and predicted")
    err.axhline(0.0, color="k", lw=1)
    err.set_ylabel("measured / predicted $-$ 1 (%)")
    err.set_title("relative error of the measured rate")
    for axis in (ax, err):
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    if arrhenius:
        _arrhenius(axes[2], rows, model, params, cfg)
    return save_figure(fig, out / "sweep.png", dpi=100)


def _arrhenius(ax, rows: list[dict], model: str, params: dict, cfg: dict) -> None:
    """``log rate`` vs ``1/tau``: measured points per kind, the fitted barrier of the WPG runs, Eyring-Kramers."""
    depth = float(params.get("depth", 1.0 if model == "double_well_bandit" else 0.0))  # the models' defaults
    width = float(params.get("width", 1.0))
    flow = cfg.get("flow", {})
    dt = None if flow.get("adaptive") else float(flow.get("dt", 0.01))
    for colour, kind in enumerate(dict.fromkeys(r["kind"] for r in rows)):
        pts = sorted((1 / r["value"], r["measured_rate"]) for r in rows
                     if r["kind"] == kind and r.get("measured_rate") is not None and r["measured_rate"] > 0)
        if not pts:
            continue
        x, y = map(np.array, zip(*pts))
        ax.semilogy(x, y, "o", color=f"C{colour}", mfc="none", ms=7, label=f"{kind}: measured")
        if kind == "wasserstein" and x.size >= 2:
            slope, intercept = np.polyfit(x, np.log(y), 1)
            xx = np.linspace(x.min(), x.max(), 50)
            ax.semilogy(xx, np.exp(intercept + slope * xx), "-", color=f"C{colour}", lw=1.2,
                        label=f"Arrhenius fit: barrier {-slope:.3g} (reward barrier depth = {depth:g})")
    taus = np.array([r["value"] for r in rows])
    if depth > 0:
        xx = np.linspace(1 / taus.max(), 1 / taus.min(), 100)
        label = (r"Eyring–Kramers $2\log(1+\Delta t\,\ell)/\Delta t$, "
                 r"$\ell=\frac{4\sqrt{2}}{\pi}\frac{d}{w^2}e^{-d/\tau}$"
                 if dt is not None else r"Eyring–Kramers $\frac{8\sqrt{2}}{\pi}\frac{d}{w^2}e^{-d/\tau}$")
        ax.semilogy(xx, eyring_kramers(1 / xx, depth, width, dt), "k--", lw=1.5, label=label + " (theory.md §5.4)")
    plain_log_axis(ax.yaxis)
    ax.set_xlabel(r"$1/\tau$")
    ax.set_ylabel("measured rate (log scale)")
    ax.set_title(r"Arrhenius plot: slope $=-$barrier for a rate $\propto e^{-\mathrm{barrier}/\tau}$", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


# --- wpgflow study (solver.study): study.png ---
def plot_study(out: Path) -> Path:
    """``out/study.png`` from ``study.csv`` alone: one panel per headline number, its relative change from the
    base run (percent, symlog) against the refinement level, one line per axis (mesh, dt, domain), with the
    ``resolved`` band of :data:`solver.study.RESOLVED` (2%) shaded and the quantity's verdict in the title."""
    import textwrap

    with open(Path(out) / "study.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    quantities = list(dict.fromkeys(r["quantity"] for r in rows))
    cols = min(3, max(1, len(quantities)))
    nrows = max(1, math.ceil(len(quantities) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    for n, q in enumerate(quantities):
        ax = axes[n // cols, n % cols]
        mine = [r for r in rows if r["quantity"] == q]
        top, levels = 3.0, 1
        for colour, axis in enumerate(("mesh", "dt", "domain")):
            pts = [(0, 0.0)] + [(int(r["level"]), 100 * float(r["change"])) for r in mine
                                if r["axis"] == axis and r["change"] != ""]
            if len(pts) > 1:
                x, y = zip(*sorted(pts))
                ax.plot(x, y, "o-", color=f"C{colour}", label=axis)
                top, levels = max(top, 2 * max(abs(v) for v in y)), max(levels, max(x))
        ax.axhspan(-2, 2, color="0.9", zorder=0, label="±2% (resolved)")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_ylim(-top, top)
        ax.set_xticks(range(levels + 1))
        ax.set_xlabel("refinement level")
        ax.set_ylabel("change from base (%)")
        verdict = mine[0]["verdict"].split(" (runs say")[0] if mine else ""
        runs_say = " (a run says transient / domain-sensitive)" if mine and "(runs say" in mine[0]["verdict"] else ""
        ax.set_title("\n".join(textwrap.wrap(f"{q}: {verdict}{runs_say}", 48)), fontsize=9)
        ax.grid(True, alpha=0.3)
        if n == 0:
            ax.legend(fontsize=8)
    for n in range(len(quantities), nrows * cols):
        axes[n // cols, n % cols].axis("off")
    fig.suptitle(f"refinement study {Path(out).resolve().name}: change of each headline number from the base run "
                 "(mesh: cells x2, dt: /2, domain: room for every next-state mean, then x1.5; settings in study.csv)")
    fig.tight_layout()
    return save_figure(fig, Path(out) / "study.png")
# --- end wpgflow study ---


# --- hypothesis ledger and counterexample search (solver.ledger, solver.search) ---

def _csv_columns(file: Path) -> dict[str, np.ndarray]:
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))
    return {c: np.array([float(r[c]) for r in rows]) for c in (rows[0].keys() if rows else ())}


#: Values drawn on a log axis are capped here (a ratio ``p / G`` is ``inf`` where ``G`` underflowed): matplotlib's
#: log ticks overflow on ``inf`` and, with the axis margins, on values within ~20 decades of the largest double.
LOG_CAP = 1e200


def _loggable(y: np.ndarray) -> np.ndarray:
    """``y`` for a log axis: ``+inf`` and values above :data:`LOG_CAP` drawn at the cap, non-positive as gaps."""
    y = np.where(np.isposinf(y), LOG_CAP, np.asarray(y, dtype=float))
    return np.where(np.isfinite(y) & (y > 0), np.minimum(y, LOG_CAP), np.nan)


def plot_regularity(path: Path) -> Path | None:
    """``regularity.png`` from ``hypotheses.csv``: over flow time, the worst over states of ``sup|d_a Q|``,
    ``sup|Hess_a Q|`` and ``osc_a Q`` against their a-priori bounds (dashed), the semiconvexity constant, the
    Fisher information and ``sup |grad log p|``, and the range of ``p / G``. None if the run has no ledger."""
    path = Path(path)
    file = path / "hypotheses.csv"
    if not file.exists():
        return None
    c = _csv_columns(file)
    if not c or not c["t"].size:
        return None
    times = np.unique(c["t"])

    def per_t(values, reduce):
        values = np.where(np.isposinf(values), LOG_CAP, values)  # inf ratios: off the scale, not a failure
        return np.array([reduce(values[c["t"] == t]) if np.isfinite(values[c["t"] == t]).any() else np.nan
                         for t in times])

    tt = np.maximum(times, times[times > 0].min() / 2 if (times > 0).any() else 1.0)
    d2 = np.maximum(np.abs(c["d2Q_min"]), np.abs(c["d2Q_max"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for k, (q, b, label) in enumerate((("dQ_sup", "dQ_bound", r"$\sup|\partial_a Q|$"), (None, "d2Q_bound",
                                       r"$\sup|\partial_a^2 Q|$"), ("oscQ", "oscQ_bound", r"osc$_a Q$"))):
        measured = d2 if q is None else c[q]
        ax.plot(tt, _loggable(per_t(measured, np.nanmax)), "o-", color=f"C{k}", label=label)
        bound = _loggable(per_t(c[b], np.nanmax))
        if np.isfinite(bound).any():
            ax.plot(tt, bound, "--", color=f"C{k}", label=f"bound ({label})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t (t = 0 drawn at the left edge)")
    ax.set_ylabel("worst over states (log scale)")
    ax.set_title("regularity of $Q^{\\pi_t}$ (worst state) and a-priori bounds")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(tt, np.clip(per_t(c["semiconvexity"], np.nanmin), -LOG_CAP, LOG_CAP), "o-",
            label=r"semiconvexity $\min\lambda(\nabla^2(-Q/\tau+U))$")
    ax.plot(tt, np.clip(per_t(c["fisher_info"], np.nanmax), -LOG_CAP, LOG_CAP), "s-",
            label=r"Fisher information $4\|\nabla\sqrt{p}\|^2$")
    ax.plot(tt, np.clip(per_t(c["grad_log_p_sup"], np.nanmax), -LOG_CAP, LOG_CAP), "^-", label=r"$\sup|\nabla\log p|$")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("t")
    ax.set_ylabel("worst over states (symlog scale)")
    ax.set_title("regularity of the solution (worst state)")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot(tt, _loggable(per_t(c["ratio_min"], np.nanmin)), "o-", label=r"$\min p_t/G_t$")
    ax.plot(tt, _loggable(per_t(c["ratio_max"], np.nanmax)), "s-", label=r"$\max p_t/G_t$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel(r"$p_t/G_t$ (log scale; $\infty$ drawn at $10^{200}$)")
    ax.set_title("density ratio to the Gibbs policy")
    ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"hypothesis ledger of {path.resolve().name} (wpgflow hypotheses {path.name})")
    fig.tight_layout()
    return save_figure(fig, path / "regularity.png")


def plot_search(out: Path) -> Path | None:
    """``search.png`` from ``search.csv``: the objective of every evaluation in order, and the best so far."""
    out = Path(out)
    file = out / "search.csv"
    if not file.exists():
        return None
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    y = np.array([float(r["objective"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(y.size), y, ".", color="0.5", label="evaluation")
    finite = np.where(np.isfinite(y), y, np.inf)
    ax.plot(np.arange(y.size), np.minimum.accumulate(finite), "-", color="C3", label="best so far")
    if np.all(y[np.isfinite(y)] > 0):
        ax.set_yscale("log")
    ax.set_xlabel("evaluation")
    ax.set_ylabel(f"objective ({rows[0].get('objective_name', '')}, minimised)")
    ax.set_title(f"counterexample search {out.resolve().name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out / "search.png")
