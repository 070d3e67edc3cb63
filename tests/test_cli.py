"""The command line: shipped experiments end to end, output files, and polite failure on bad input."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from solver import budget, cli, runner
from solver.flows import wasserstein
from solver.diagnostics import HISTORY_COLUMNS

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"

# Tiny grids so every shipped config runs in seconds; the physics is the shipped one.
TINY = ["--set", "actions.cells=48", "--set", "flow.t_end=0.5", "--set", "output.snapshots=4", "--quiet"]
TINY_STATES = ["--set", "states.n=17"]


@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS.glob("*.toml")))
def test_every_shipped_experiment_runs(tmp_path, name, shipped_runs):
    """Every shipped config runs (tiny) to a complete run directory: its files, a monotone J, the summary keys, the
    snapshots, and ``wpgflow plot`` draws the figures from the files alone. The experiments that are not sweeps
    are the session's shared runs (tests/conftest.py, whose figures are described, not written: the PNGs here come
    from ``wpgflow plot``); the sweep configs run here as single runs."""
    figures = ("convergence.png", "density.png", "policy.png")
    if name in shipped_runs:
        out, drawn = shipped_runs[name]
        assert set(figures) <= set(drawn), sorted(drawn)  # the run drew them
    else:
        config = EXPERIMENTS / f"{name}.toml"
        text = config.read_text()
        extra = TINY_STATES if "[states]" in text else []
        assert cli.main(["run", str(config), "--out", str(tmp_path / name), *TINY, *extra]) == 0
        out = tmp_path / name
        for f in figures:
            assert (out / f).stat().st_size > 0, f
    for f in ("config.toml", "history.csv", "summary.json", "solution.npz"):
        assert (out / f).stat().st_size > 0, f
    with open(out / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == HISTORY_COLUMNS
    J = np.array([float(r["J"]) for r in rows])
    assert np.diff(J).min() > -1e-12 * np.abs(J).max()
    summary = json.loads((out / "summary.json").read_text())
    for key in ("J_star", "J_final", "gap_initial", "gap_final", "rate", "rate_r2", "steps", "t_final",
                "wall_time_s", "time_per_step_s", "monotone", "max_mass_error", "min_density", "versions"):
        assert key in summary, key
    assert summary["monotone"] is True
    assert summary["max_mass_error"] < 1e-12
    assert set(summary["versions"]) == {"wpgflow", "dolfinx", "numpy", "scipy"}
    with np.load(out / "solution.npz") as sol:
        n, m = sol["pi_star"].shape
        assert sol["snapshots_pi"].shape[1:] == (n, m)
        assert sol["snapshots_t"][0] == 0.0 and sol["snapshots_t"][-1] == pytest.approx(summary["t_final"])
        np.testing.assert_allclose(sol["pi_final"] @ sol["weights"], 1.0, atol=1e-12)
    # `wpgflow plot` (re)draws the figures from the files alone
    for f in figures:
        (out / f).unlink(missing_ok=True)
    assert cli.main(["plot", str(out)]) == 0
    for f in figures:
        assert (out / f).stat().st_size > 0, f


def test_lqr_summary_reports_the_closed_form(tmp_path):
    out = tmp_path / "lqr"
    assert cli.main(["run", str(EXPERIMENTS / "lqr_1d.toml"), "--out", str(out), "--quiet",
                     "--set", "flow.t_end=0.05"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["oracle"]["P"] == pytest.approx(1.7028101010, abs=1e-9)
    assert summary["oracle"]["V_star_max_error_interior"] < 1e-6
    assert summary["oracle"]["rate_implicit_euler"] == pytest.approx(3.5016947346, abs=1e-9)


def test_resolved_config_round_trips(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", str(EXPERIMENTS / "bandit_ou.toml"), "--out", str(out), *TINY,
                     "--set", "mdp.tau=0.25"]) == 0
    again = tmp_path / "again"
    assert cli.main(["run", str(out / "config.toml"), "--out", str(again), "--quiet"]) == 0
    first, second = (json.loads((d / "summary.json").read_text()) for d in (out, again))
    assert first["J_final"] == second["J_final"]  # deterministic, and the written config is complete


BAD = [
    (["--set", "mdp.gamma=1.0"], "mdp.gamma: must be in [0, 1)"),
    (["--set", "mdp.tau=0"], "mdp.tau: must be a finite number > 0"),
    (["--set", "mdp.tau=nan"], "mdp.tau: must be a finite number > 0"),
    (["--set", "mdp.gama=0.5"], "mdp.gama: unknown key (allowed: model, gamma, tau, params)"),
    (["--set", "states.n=0"], "states.n: must be an integer >= 1"),
    (["--set", "states.n=1"], "states.n: model 'lqr' needs n >= 2 states"),
    (["--set", "states.n=[5,5]"], "states.lower: must be a list [x, y] like the other [states] keys"),
    (["--set", "states.lower=[-1,-1]", "--set", "states.upper=[1,1]", "--set", "states.n=[5,1]"],
     "states.n: must be a list [nx, ny] of two integers >= 2"),
    (["--set", "states.lower=[-1,-1]", "--set", "states.upper=[1,1]", "--set", "states.n=[5,5]"],
     "states: model 'lqr' has 1D states, so [states] lower, upper and n must be numbers"),
    (["--set", "actions.lower=7"], "actions.lower: must be < actions.upper"),
    (["--set", "flow.dt=-1"], "flow.dt: must be a finite number > 0"),
    (["--set", "flow.kind=euler"], "flow.kind: must be one of 'wasserstein'"),
    (["--set", "mdp.model=nope"], "mdp.model: unknown model 'nope'"),
    (["--set", "mdp.model=tests.user_model:not_a_model", "--set", "mdp.params={}"],
     "mdp.model: tests.user_model:not_a_model must return solver.models.Model"),
    (["--set", "mdp.model=no_such_pkg.mod:f"], "mdp.model: cannot import module 'no_such_pkg.mod'"),
    (["--set", "mdp.params.C=1"], "mdp.params.C: unknown parameter for model 'lqr'"),
    (["--set", "mdp.params.sigma=-1"], "mdp.params.sigma: must be > 0"),
    (["--set", "flow.dt=true"], "flow.dt: must be a number"),
    (["--set", "noequals"], "--set 'noequals': expected KEY=VALUE"),
    (["--set", "output=3"], "output: must be a table"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[b[1].split(":")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code = cli.main(["run", str(EXPERIMENTS / "lqr_1d.toml"), "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_missing_and_malformed_config_files(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[mdp\nmodel = 'lqr'\n")
    assert cli.main(["run", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_unknown_command_line_option_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "x.toml", "--frobnicate"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_existing_run_dir_is_not_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", str(EXPERIMENTS / "bandit_ou.toml"), "--out", str(out), *TINY]
    assert cli.main(args) == 0
    (out / "notes.txt").write_text("mine")
    before = (out / "summary.json").read_bytes()
    assert cli.main(args) == 2
    assert "run directory exists" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before
    assert cli.main([*args, "--force", "--set", "flow.t_end=0.25"]) == 0
    assert (out / "summary.json").read_bytes() != before
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces only wpgflow's own files


def test_user_model_by_import_path(tmp_path):
    out = tmp_path / "user"
    assert cli.main(["run", str(EXPERIMENTS / "lqr_1d.toml"), "--out", str(out), *TINY, *TINY_STATES,
                     "--set", "mdp.model=tests.user_model:quadratic", "--set", "mdp.params={k = 2.0}"]) == 0
    assert json.loads((out / "summary.json").read_text())["model"] == "tests.user_model:quadratic"


def test_large_runs_keep_snapshot_policies_of_the_drawn_states_only(tmp_path, monkeypatch):
    """Above budget.SNAPSHOT_BYTES only the plotted and XDMF states' snapshot policies are kept (memory O(N M));
    what is kept, V at every snapshot, rates.csv (computed during the run) and density.xdmf are unchanged."""
    args = ["run", str(EXPERIMENTS / "lqr_1d.toml"), *TINY, *TINY_STATES]
    assert cli.main([*args, "--out", str(tmp_path / "all")]) == 0
    monkeypatch.setattr(budget, "SNAPSHOT_BYTES", 0)
    assert cli.main([*args, "--out", str(tmp_path / "few")]) == 0
    full, few = (np.load(tmp_path / name / "solution.npz") for name in ("all", "few"))
    kept = few["snapshot_states"]
    assert kept.tolist() == [0, 4, 8, 12, 16]  # 17 states: drawn 4, 8, 12; density.xdmf 0, 8, 16
    assert np.array_equal(full["snapshot_states"], np.arange(17))
    assert np.array_equal(few["snapshots_pi"], full["snapshots_pi"][:, kept])
    assert np.array_equal(few["snapshots_V"], full["snapshots_V"])
    for name in ("rates.csv", "density.xdmf", "history.csv"):
        assert (tmp_path / "few" / name).read_bytes() == (tmp_path / "all" / name).read_bytes(), name


def test_user_model_with_2d_states_and_1d_actions(tmp_path):
    """A 2D state grid with a 1D action interval: the run and its plots (policy drawn over the state index)."""
    out = tmp_path / "plane"
    assert cli.main(["run", str(EXPERIMENTS / "lqr_1d.toml"), "--out", str(out), *TINY,
                     "--set", "mdp.model=tests.user_model:plane_state", "--set", "mdp.params={}",
                     "--set", "states.lower=[-1,-1]", "--set", "states.upper=[1,1]", "--set", "states.n=[5,4]"]) == 0
    solution = np.load(out / "solution.npz")
    assert solution["states"].shape == (20, 2) and solution["actions"].ndim == 1
    np.testing.assert_allclose(solution["states"][1], [-1.0, -1.0 / 3], rtol=1e-15)  # row-major: kx * ny + ky
    summary = json.loads((out / "summary.json").read_text())
    assert summary["monotone"] and summary["max_mass_error"] < 1e-13
    for f in ("convergence.png", "density.png", "policy.png"):
        assert (out / f).stat().st_size > 0, f


def test_numerical_failure_stops_and_keeps_history(tmp_path, capsys, monkeypatch):
    real_step = wasserstein.implicit_step
    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        new = real_step(*args, **kwargs)
        return new * np.nan if len(calls) == 3 else new

    monkeypatch.setattr(wasserstein, "implicit_step", failing_step)
    out = tmp_path / "fail"
    code = cli.main(["run", str(EXPERIMENTS / "bandit_ou.toml"), "--out", str(out), *TINY])
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite values" in err and "Traceback" not in err
    with open(out / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3  # t = 0 and the two good steps were kept
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"


def test_adaptive_steps_grow_and_stay_monotone(tmp_path):
    out = tmp_path / "adaptive"
    assert cli.main(["run", str(EXPERIMENTS / "bandit_ou.toml"), "--out", str(out), "--quiet",
                     "--set", "flow.adaptive=true", "--set", "flow.t_end=20", "--set", "flow.dt=0.01"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "history.csv") as fh:
        dts = [float(r["dt"]) for r in csv.DictReader(fh)][1:]
    assert summary["status"] == "converged" and summary["monotone"]
    assert max(dts) > 20 * dts[0]  # the controller lengthens steps as the flow settles
    assert summary["steps"] < 400  # a fixed dt = 0.01 would need ~1800 steps to reach the same gap


def test_experiment_api_without_files():
    """The library runs without the CLI: build a problem, run it, observe it."""
    from solver import config
    from solver.observers import Observer

    cfg = config.load(EXPERIMENTS / "bandit_ou.toml", ["actions.cells=32", "flow.t_end=0.1"])
    seen = []

    class Times(Observer):
        def observe(self, row, state):
            seen.append(state.t)

    result = runner.run(runner.build(cfg), [Times()])
    assert result.status == "t_end" and seen[0] == 0.0 and seen[-1] == pytest.approx(0.1)


@pytest.fixture(autouse=True)
def _no_stray_runs_dir():
    """Tests pass --out explicitly; make sure none writes into the repository's runs/."""
    runs = Path("runs")
    existed = runs.exists()
    yield
    if not existed and runs.exists():
        shutil.rmtree(runs)
        pytest.fail("a test wrote into ./runs")
