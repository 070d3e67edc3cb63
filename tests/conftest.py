"""Shared fixtures: small discretised problems (DOLFINx meshes are cheap, but build each once), and one tiny run of
every shipped experiment with its figures described (tests/test_cli.py and tests/test_figures.py)."""

import tomllib
from pathlib import Path

import numpy as np
import pytest

from solver import bellman, cli, plots
from solver.fem import interval_space
from solver.mdp import build_mdp
from solver.models import double_well, lqr

LQR_PARAMS = {"A": 0.9, "B": 0.5, "q": 1.0, "r": 0.5, "sigma": 0.3}


@pytest.fixture(scope="session")
def lqr_mdp():
    """theory.md §7.1 LQR (tau = 1) on the shipped grids: states [-6, 6] x 121, actions [-6, 6] x 256 cells."""
    return build_mdp(lqr(**LQR_PARAMS), np.linspace(-6, 6, 121), interval_space(-6, 6, 256), 0.9, 1.0)


@pytest.fixture(scope="session")
def lqr_optimum(lqr_mdp):
    return bellman.soft_policy_iteration(lqr_mdp)


@pytest.fixture(scope="session")
def small_well():
    """A small double-well MDP with the action moving the state (B != 0), for exact discrete identities."""
    model = double_well(A=0.8, B=0.4, q=1.0, depth=1.0, width=1.0, sigma=0.3)
    return build_mdp(model, np.linspace(-2, 2, 27), interval_space(-2, 2, 40), 0.8, 0.3)


def random_policy(mdp, seed=0):
    """A strictly positive, normalised, non-smooth policy (deterministic seed)."""
    p = np.random.default_rng(seed).uniform(0.1, 2.0, size=(mdp.n_states, mdp.n_actions))
    return p / (p @ mdp.weights)[:, None]


EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
RUNS = sorted(p.stem for p in EXPERIMENTS.glob("*.toml") if "[sweep]" not in p.read_text())


def tiny(config: Path) -> list[str]:
    """``--set`` options that shrink a shipped config to a few seconds (small grids, at least 6 steps, 6
    snapshots; the physics is the shipped one)."""
    text = config.read_text()
    dt = tomllib.loads(text).get("flow", {}).get("dt", 0.01)
    opts = ["--set", f"flow.t_end={max(0.3, 6 * dt)!r}", "--set", "output.snapshots=6"]  # at least 6 steps
    if 'domain = "rectangle"' in text:
        opts += ["--set", "actions.cells=6"]
    elif "domain =" in text:
        opts += ["--set", 'actions.resolution="coarse"']
    else:
        opts += ["--set", "actions.cells=40"]
    if "n = [" in text:
        opts += ["--set", "states.n=[5,5]"]
    elif "[states]" in text:
        opts += ["--set", "states.n=9"]
    return opts


def describe(fig) -> dict:
    """What the checks need from a drawn figure, as plain data (so the figure can be closed at once)."""
    fig.canvas.draw()  # lay out and create the tick labels
    axes = []
    for ax in fig.axes:
        legend = ax.get_legend()
        axes.append({
            "colorbar": ax.get_label() == "<colorbar>", "title": ax.get_title(), "xlabel": ax.get_xlabel(),
            "ylabel": ax.get_ylabel(), "has_data": ax.has_data() or bool(ax.texts),
            "ticks": [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()],
            "lines": [line.get_label() for line in ax.get_lines()],
            "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
            "extend": [getattr(c, "extend", "neither") for c in ax.collections]})
    return {"suptitle": fig._suptitle.get_text() if fig._suptitle else "", "axes": axes}


def capture(monkeypatch) -> dict:
    """``{"<dir>/<png>": describe(figure)}`` of every figure drawn from now on (PNG encoding skipped)."""
    import matplotlib.pyplot as plt

    drawn: dict[str, dict] = {}

    def keep(fig, out, dpi=100):
        drawn[f"{Path(out).parent.name}/{Path(out).name}"] = describe(fig)
        plt.close(fig)
        return out

    monkeypatch.setattr(plots, "save_figure", keep)
    return drawn


@pytest.fixture(scope="session")
def shipped_runs(tmp_path_factory):
    """``{experiment: (run_dir, {png name: description})}``: one tiny run (:func:`tiny`) of every shipped
    experiment that is not a sweep, with every figure it draws described (:func:`capture`; no PNG is written: a
    test that needs the files runs ``wpgflow plot`` on the run directory). Shared by tests/test_cli.py and
    tests/test_figures.py, so each experiment runs once per test session."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        drawn = capture(monkeypatch)
        root = tmp_path_factory.mktemp("shipped")
        for name in RUNS:
            config = EXPERIMENTS / f"{name}.toml"
            assert cli.main(["run", str(config), "--out", str(root / name), "--quiet", *tiny(config)]) == 0, name
    return {name: (root / name, {k.split("/")[1]: v for k, v in drawn.items() if k.split("/")[0] == name})
            for name in RUNS}
