"""Every figure of a tiny run of every shipped experiment, checked with matplotlib's API (not pixels).

Each figure must have axes with data, and every axes (colour bars aside) a title and both axis labels. Beside
that, the points of issue 15 that can be read off the figure objects: the run's parameters in the titles, the
honest maximum over states in the 2D policy title, no empty ``t = 0`` panel and six times in the 2D density,
no ``extend`` arrows on density colour bars, ``rates.png`` tick labels without ``x10^``, ``sweep.png`` labelled
``tau`` (not ``mdp.tau``) with a relative-error panel, and its Arrhenius panel only for a barrier model.
The movie (``wpgflow animate``) of a 1D and a 2D run: one frame per snapshot, opened with Pillow.
"""

import json
import tomllib

import numpy as np
import pytest

from solver import cli, plots, sweep

from .conftest import EXPERIMENTS, capture, tiny

SWEEPS = sorted(p.stem for p in EXPERIMENTS.glob("*.toml") if "[sweep]" in p.read_text())


@pytest.fixture(scope="module")
def figures(shipped_runs):
    """The shared tiny runs of every shipped experiment and their figures (tests/conftest.py)."""
    return shipped_runs


def check_figure(fig: dict, where: str) -> None:
    axes = [ax for ax in fig["axes"] if not ax["colorbar"]]
    assert axes, f"{where}: no axes"
    for ax in axes:
        what = f"{where}, axes {ax['title']!r}"
        assert ax["title"].strip(), f"{where}: an axes without a title"
        assert ax["xlabel"].strip() and ax["ylabel"].strip(), f"{what}: unlabelled axis"
        assert ax["has_data"], f"{what}: empty"
    for cax in (ax for ax in fig["axes"] if ax["colorbar"]):
        assert (cax["ylabel"] or cax["xlabel"]).strip(), f"{where}: colour bar without a label"


def test_every_figure_of_every_experiment_is_labelled_and_not_empty(figures):
    for name, (out, drawn) in figures.items():
        expected = {"convergence.png", "density.png", "policy.png"} | ({"rates.png"} if (out / "rates.csv").exists()
                                                                         else set())
        assert expected <= set(drawn), (name, sorted(drawn))
        for png, fig in drawn.items():
            check_figure(fig, f"{name}/{png}")


def plain(fig: dict) -> list[dict]:
    return [ax for ax in fig["axes"] if not ax["colorbar"]]


def test_titles_carry_the_run_parameters(figures):
    for name, (out, drawn) in figures.items():
        cfg = tomllib.loads((out / "config.toml").read_text())
        title = drawn["convergence.png"]["suptitle"]
        assert f"= {cfg['mdp']['tau']:g}" in title and f"= {cfg['mdp']['gamma']:g}" in title, title
        assert f"{cfg['flow']['dt']:g}" in title and "action DOFs" in title, title
        # three panels: gap, local rate, measured / predicted dJ/dt (a ratio, not two identical curves)
        assert plain(drawn["convergence.png"])[2]["ylabel"] == "measured / predicted dJ/dt"


def test_2d_policy_title_is_the_maximum_over_states(figures):
    for name in ("lqr_2d_action", "ring_disk"):
        out, drawn = figures[name]
        with np.load(out / "solution.npz") as sol:
            worst = np.max(np.abs(sol["pi_final"] - sol["pi_star"]))
        assert f"{worst:.2e}" in drawn["policy.png"]["suptitle"]


def test_2d_density_has_six_positive_times_and_no_extension_arrows(figures):
    out, drawn = figures["ring_disk"]
    titles = [ax["title"] for ax in plain(drawn["density.png"])]
    first_row = [t for t in titles if t.startswith(titles[0].split(",")[0])]
    with np.load(out / "solution.npz") as sol:
        n_positive = int(np.sum(sol["snapshots_t"] > 0))
    assert len(first_row) == min(6, n_positive) + 1  # the times and pi*
    assert not any(t.endswith("t = 0") for t in titles)
    assert all(e == "neither" for ax in drawn["density.png"]["axes"] for e in ax["extend"])


def test_tick_labels_are_plain_numbers(figures):
    for name, (_, drawn) in figures.items():
        for ax in drawn.get("rates.png", {"axes": []})["axes"]:
            assert not any("times" in t for t in ax["ticks"]), (name, ax["ticks"])


def test_bandit_density_draws_the_exact_ou_gaussian(figures):
    assert "exact OU Gaussian" in [label for ax in figures["bandit_ou"][1]["density.png"]["axes"]
                                   for label in ax["lines"]]


def test_animation_of_a_1d_and_a_2d_run(figures):
    from PIL import Image

    for name in ("lqr_1d", "ring_disk"):
        out = figures[name][0]
        assert cli.main(["animate", str(out), "--fps", "4"]) == 0
        with np.load(out / "solution.npz") as sol:
            snapshots = sol["snapshots_t"].size
        with Image.open(out / "density.gif") as gif:
            # one frame per snapshot; Pillow merges identical consecutive frames (the held last one)
            assert snapshots - 1 <= gif.n_frames <= snapshots + 4
            assert gif.size[0] > 300 and gif.size[1] > 200


def test_animation_refuses_a_bad_format_politely(figures, capsys):
    out = figures["lqr_1d"][0]
    assert cli.main(["animate", str(out), "--out", str(out / "movie.avi")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".gif or .mp4" in err
    assert not (out / "movie.avi").exists()


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_figure(tmp_path, monkeypatch, name):
    """A two-value sweep of each shipped sweep config, run in this process (no plots per run)."""
    config = EXPERIMENTS / f"{name}.toml"
    raw = tomllib.loads(config.read_text())
    values = raw["sweep"]["values"][-2:]
    overrides = tiny(config)[1::2] + ["flow.t_end=2.0", "output.snapshots=4"]
    plan = sweep.plan(config, f"{raw['sweep']['param']}={','.join(map(str, values))}", None, overrides,
                      tmp_path / name, False)
    monkeypatch.setattr(plots, "plot_run", lambda path: [])
    rows = [sweep.execute_task(task) for task in plan.tasks]
    sweep.write_csv(plan.out, rows)
    drawn = capture(monkeypatch)
    plots.plot_sweep(plan.out, sweep.read_csv(plan.out))
    fig = drawn[f"{name}/sweep.png"]
    check_figure(fig, f"{name}/sweep.png")
    axes = plain(fig)
    assert "mdp.tau" not in [ax["xlabel"] for ax in axes] and axes[0]["xlabel"] == r"temperature $\tau$"
    assert any("relative error" in ax["title"] for ax in axes)
    barrier = json.loads((plan.out / rows[0]["run_dir"] / "summary.json").read_text())["model"] in plots.BARRIER_MODELS
    assert len(axes) == (3 if barrier else 2)
    if barrier:
        assert any("barrier" in t for t in axes[2]["legend"]) and any("Eyring" in t for t in axes[2]["legend"])


def test_regularity_figure_survives_infinite_ratios(figures, tmp_path):
    """p / G is inf where G underflows (the tau = 0.1 LQR sweep run): regularity.png must still be drawn, and
    RuntimeWarnings (overflow in matplotlib's log ticks) are errors here (setup.cfg)."""
    import csv
    import shutil

    from solver import plots

    run = tmp_path / "run"
    shutil.copytree(figures["lqr_1d"][0], run)
    with open(run / "hypotheses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for k, row in enumerate(rows):
        row["ratio_max"] = "inf" if k % 2 else "1e308"
        row["ratio_min"] = "0.0"
    with open(run / "hypotheses.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert plots.plot_regularity(run) == run / "regularity.png"
