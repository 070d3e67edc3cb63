"""``wpgflow animate RUN_DIR``: a movie of the policy density over flow time, drawn from the run's files alone.

One frame per snapshot of ``solution.npz``. The snapshots are geometrically spaced in flow time
(:class:`solver.observers.Schedule`), so consecutive frames are close where the density changes fast (the
initial transient) and far apart in the slow tail: at a constant frame rate the motion is even. Each frame shows
up to three distinct states (those of ``density.png``, :func:`solver.plots.distinct_columns`) with the density at
that time beside (1D: on top of, dashed) ``pi*``, and the title gives the flow time and the gap ``J* - J`` there
(from ``history.csv``). The last frame is held for a second.

Formats: ``.gif`` with Pillow (a matplotlib dependency, always available: each frame is drawn once and the
last one is given a longer duration); ``.mp4`` with matplotlib's ffmpeg writer, only where ffmpeg is installed
(else a one-line error, exit 2). ``output.animation = true`` writes ``density.gif`` at the end of ``wpgflow run``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..outputs import read_run
from . import distinct_columns, run_config, run_title, shown_snapshots, state_label, time_label

#: Default frames per second of ``density.gif``.
FPS = 8

#: Resolution of the movie frames (dots per inch).
DPI = 80


def animate(run_dir: Path, out: Path | None = None, fps: int | None = None) -> Path:
    """Write the density movie of the run in ``run_dir`` to ``out`` (default ``run_dir/density.gif``).

    Raises:
        ConfigError: ``run_dir`` is not a run directory, ``out`` is not ``.gif`` / ``.mp4``, ``.mp4`` without
            ffmpeg, or ``fps < 1``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import animation

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "density.gif"
    fps = FPS if fps is None else fps
    if fps < 1:
        raise ConfigError(f"--fps: must be an integer >= 1 (got {fps})")
    suffix = out.suffix.lower()
    writer = None
    if suffix == ".mp4":
        if not animation.writers.is_available("ffmpeg"):
            raise ConfigError(f"--out {out}: writing .mp4 needs ffmpeg, which is not installed (use a .gif name)")
        writer = animation.FFMpegWriter(fps=fps, bitrate=2000)
    elif suffix != ".gif":
        raise ConfigError(f"--out {out}: the movie format is set by the suffix: .gif or .mp4 (got {out.suffix!r})")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: directory {out.parent} does not exist")
    summary, history, solution = read_run(run_dir)
    cfg = run_config(run_dir)
    times = solution["snapshots_t"]
    if times.size == 0:
        raise ConfigError(f"{run_dir}: the run has no snapshots to animate")
    shown, snaps = shown_snapshots(solution)
    cols = distinct_columns(solution["pi_star"], snaps, shown)
    gaps = np.interp(times, history["t"], history["gap"]) if history["t"].size else np.full(times.size, np.nan)
    if solution["actions"].ndim == 2:
        fig, update = _frames_2d(plt, solution, snaps, shown, cols)
    else:
        fig, update = _frames_1d(plt, solution, snaps, shown, cols)
    title = fig.suptitle("", fontsize=11)
    head = run_title(summary, cfg)

    def draw(k: int):
        title.set_text(f"{head}\nt = {time_label(times[k])}   gap $J^*-J$ = {gaps[k]:.2e}   "
                       f"(frame {k + 1} of {times.size}, log-spaced in t)")
        return update(k)

    draw(times.size - 1)
    fig.canvas.draw()  # lay out once (constrained layout is costly), then keep that layout for every frame
    fig.set_layout_engine("none")
    if writer is None:
        _save_gif(fig, draw, times.size, fps, out)
    else:
        frames = list(range(times.size)) + [times.size - 1] * fps  # hold the final state for a second
        animation.FuncAnimation(fig, draw, frames=frames, blit=False).save(str(out), writer=writer, dpi=DPI)
    plt.close(fig)
    return out


def _save_gif(fig, draw, count: int, fps: int, out: Path) -> None:
    """Draw frames ``0 .. count - 1`` once each and write them as a looping GIF, the last one held for a second."""
    from PIL import Image

    fig.set_dpi(DPI)
    images = []
    for k in range(count):
        draw(k)
        fig.canvas.draw()
        images.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()))
    step = max(1, round(1000 / fps))  # ms per frame
    images[0].save(out, save_all=True, append_images=images[1:], duration=[step] * (count - 1) + [max(step, 1000)],
                   loop=0, optimize=False)


def _frames_1d(plt, solution: dict, snaps: np.ndarray, shown: list[int], cols: list[int]):
    """One panel per distinct state: ``p(t, a)`` (solid) on top of ``pi*`` (dashed), a fixed y range."""
    a, pi_star, states = solution["actions"], solution["pi_star"], solution["states"]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.6 * len(cols) + 0.6, 4.2), squeeze=False, layout="constrained")
    top = 1.05 * max(float(snaps[:, cols].max()), float(pi_star[[shown[c] for c in cols]].max()))
    lines = []
    for ax, col in zip(axes[0], cols):
        i = shown[col]
        ax.plot(a, pi_star[i], "k--", lw=1.8, label=r"optimum $\pi^*$")
        (line,) = ax.plot(a, snaps[0, col], color="C0", lw=2, label=r"$p(t, a)$")
        lines.append((line, col))
        ax.set_ylim(0, top)
        ax.set_xlabel("action a")
        ax.set_ylabel("policy density")
        ax.set_title(state_label(states, i), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")

    def update(k: int):
        for line, col in lines:
            line.set_ydata(snaps[k, col])
        return [line for line, _ in lines]

    return fig, update


def _frames_2d(plt, solution: dict, snaps: np.ndarray, shown: list[int], cols: list[int]):
    """One row per distinct state: ``p(t, a)`` and ``pi*`` on the mesh, one colour bar per state.

    Each triangle is coloured by the mean of its three nodal values (flat shading: Gouraud shading costs ~1 s of
    drawing per frame on a fine mesh, and a GIF's 256 colours would band it anyway).
    """
    import matplotlib.tri as mtri

    a, cells, pi_star, states = solution["actions"], solution["cells"], solution["pi_star"], solution["states"]
    tri = mtri.Triangulation(a[:, 0], a[:, 1], cells)
    fig, axes = plt.subplots(len(cols), 2, figsize=(7.4, 3.3 * len(cols) + 0.7), squeeze=False, layout="constrained")
    meshes = []
    for row, col in zip(axes, cols):
        i = shown[col]
        vmax = max(float(snaps[:, col].max()), float(pi_star[i].max()))
        mesh = row[0].tripcolor(tri, facecolors=snaps[0, col][cells].mean(axis=1), cmap="viridis", vmin=0, vmax=vmax)
        row[1].tripcolor(tri, facecolors=pi_star[i][cells].mean(axis=1), cmap="viridis", vmin=0, vmax=vmax)
        meshes.append((mesh, col))
        row[0].set_title(f"{state_label(states, i)}: $p(t, a)$", fontsize=10)
        row[1].set_title(rf"{state_label(states, i)}: optimum $\pi^*$", fontsize=10)
        for ax in row:
            ax.set_aspect("equal")
            ax.set_xlabel("action $a_1$")
            ax.set_ylabel("action $a_2$")
        fig.colorbar(mesh, ax=list(row), label="policy density", shrink=0.9)

    def update(k: int):
        for mesh, col in meshes:
            mesh.set_array(snaps[k, col][cells].mean(axis=1))
        return [mesh for mesh, _ in meshes]

    return fig, update
