"""``wpgflow sweep``: the grid, its files, the rates it reports, bad input, overwrite protection and Ctrl-C."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from solver import cli, config, pool, sweep
from solver.config import ConfigError

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
ROOT = EXPERIMENTS.parent

# One-state OU bandit (theory.md §7.3), tiny: with r = -k (a - c)^2 / 2 the Gibbs policy is N(c, tau / k), so the
# WPG rate is 2 tau * (k / tau) = 2k for every tau, while Fisher-Rao's is 2 tau (theory.md §6).
BANDIT = """
[mdp]
model = "bandit"
gamma = 0.9
tau = 0.5
params = { k = 1.0, center = 0.5 }

[actions]
lower = -6.0
upper = 6.0
cells = 96

[flow]
dt = 0.05
t_end = 80.0
gap_tol = 1e-10
init = "gaussian"
init_mean = -0.5
init_std = 0.5

[output]
snapshots = 4
"""
SWEEP_TABLE = '\n[sweep]\nparam = "mdp.tau"\nvalues = [0.25, 1]\nkinds = ["wasserstein", "fisher_rao"]\n'


@pytest.fixture
def bandit_config(tmp_path):
    path = tmp_path / "ou.toml"
    path.write_text(BANDIT)
    return path


def read_rows(out):
    with open(out / "sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_bandit_sweep_rates_files_and_determinism(tmp_path, bandit_config):
    out = tmp_path / "sw"
    args = ["sweep", str(bandit_config), "--param", "mdp.tau=0.5,1", "--out", str(out), "--quiet"]
    assert cli.main([*args, "--kinds", "wasserstein,fisher_rao", "--jobs", "2"]) == 0
    columns, rows = read_rows(out)
    assert tuple(columns) == sweep.SWEEP_COLUMNS
    # grid order (kinds outer, values inner), whatever order the workers finished in
    assert [(r["kind"], r["value"]) for r in rows] == [(k, v) for k in ("wasserstein", "fisher_rao")
                                                      for v in ("0.5", "1")]
    for r in rows:
        assert r["status"] == "converged" and r["param"] == "mdp.tau"
        run_dir = out / r["run_dir"]
        assert run_dir == out / r["kind"] / f"mdp.tau={r['value']}"
        for name in ("config.toml", "history.csv", "summary.json", "solution.npz", "convergence.png"):
            assert (run_dir / name).stat().st_size > 0, name
        # each run's config is that run alone: the swept value and kind applied, no [sweep] table
        cfg = config.load(run_dir / "config.toml")
        assert cfg.mdp.tau == float(r["value"]) and cfg.flow.kind == r["kind"] and cfg.sweep is None
        # the fitted rate is the theory's: OU and FR gaps are single exponentials, so 1% is generous
        assert float(r["measured_rate"]) == pytest.approx(float(r["predicted_rate"]), rel=1e-2)
    wpg = [float(r["measured_rate"]) for r in rows if r["kind"] == "wasserstein"]
    fr = [float(r["measured_rate"]) for r in rows if r["kind"] == "fisher_rao"]
    # WPG: 2 log(1 + dt k)/dt = 1.9516 for every tau (doubling tau moves it < 1%: the O(h^2) of the mesh);
    # FR: 2 log(1 + tau dt)/dt = 0.9877, 1.9516: proportional to tau up to the O(tau dt) of the step (1.2%)
    assert wpg[1] / wpg[0] == pytest.approx(1.0, abs=1e-2)
    assert fr[1] / fr[0] == pytest.approx(2.0, rel=2e-2)
    assert (out / "sweep.png").stat().st_size > 0
    # deterministic: one worker gives the same numbers
    assert cli.main([*args[:-2], str(tmp_path / "again"), "--quiet", "--kinds", "wasserstein", "--jobs", "1"]) == 0
    for a, b in zip(rows, read_rows(tmp_path / "again")[1]):
        assert {k: v for k, v in a.items() if k != "wall_time_s"} == {k: v for k, v in b.items() if k != "wall_time_s"}


def test_sweep_table_is_the_default_grid_and_run_ignores_it(tmp_path, bandit_config):
    bandit_config.write_text(BANDIT + SWEEP_TABLE)
    plan = sweep.plan(bandit_config, out=tmp_path / "sw")
    assert plan.param == "mdp.tau" and plan.values == [0.25, 1]
    assert [t.run_dir for t in plan.tasks] == ["wasserstein/mdp.tau=0.25", "wasserstein/mdp.tau=1",
                                               "fisher_rao/mdp.tau=0.25", "fisher_rao/mdp.tau=1"]
    # the command line wins over the table; without kinds anywhere the config's flow.kind is used
    plan = sweep.plan(bandit_config, "flow.dt=0.1,0.2", "fisher_rao", out=tmp_path / "sw")
    assert [t.run_dir for t in plan.tasks] == ["fisher_rao/flow.dt=0.1", "fisher_rao/flow.dt=0.2"]
    bandit_config.write_text(BANDIT)
    assert [t.kind for t in sweep.plan(bandit_config, "mdp.tau=1", out=tmp_path).tasks] == ["wasserstein"]
    # `wpgflow run` accepts a config with a [sweep] table and runs the config's own point
    bandit_config.write_text(BANDIT + SWEEP_TABLE)
    assert cli.main(["run", str(bandit_config), "--out", str(tmp_path / "one"), "--quiet",
                     "--set", "flow.t_end=0.2"]) == 0


@pytest.mark.parametrize("name", ["sweep_tau_lqr", "sweep_tau_double_well"])
def test_shipped_sweeps_validate(tmp_path, name):
    plan = sweep.plan(EXPERIMENTS / f"{name}.toml", out=tmp_path)
    assert plan.param == "mdp.tau" and set(plan.kinds) == {"wasserstein", "fisher_rao"}
    assert len(plan.tasks) == 2 * len(plan.values) >= 10


@pytest.mark.parametrize("extra, message", [
    (["--param", "mdp.taux=0.1,0.2"], "mdp.taux: unknown key"),
    (["--param", "mdp.tau=0.1,abc"], "--param mdp.tau: value 'abc' is not a finite number"),
    (["--param", "mdp.tau=0.1,0.1"], "repeated"),
    (["--param", "tau=0.1"], "expected KEY=V1,V2"),
    (["--param", "mdp.model=1,2"], "mdp.model: must be a string"),
    (["--param", "mdp.tau=0.5,-1"], "mdp.tau: must be a finite number > 0"),   # one bad value of many
    (["--param", "mdp.params.k=1,0"], "mdp.params.k: must be"),               # checked by the model
    (["--param", "mdp.tau=1", "--kinds", "wasserstein,nope"], "--kinds: unknown flow kind 'nope'"),
    (["--param", "mdp.tau=1", "--jobs", "0"], "--jobs: must be an integer >= 1"),
    ([], "--param: required"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, bandit_config, capsys, extra, message):
    out = tmp_path / "sw"
    assert cli.main(["sweep", str(bandit_config), "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_bad_sweep_table_is_rejected(tmp_path, bandit_config):
    for table, message in (('param = "mdp.tau"\nvalues = []', "sweep.values: must be a non-empty list"),
                           ('param = "mdp.tau"\nvalues = [1, true]', "sweep.values: must be a non-empty list"),
                           ('param = "mdp.tau"\nvalues = [1]\nkinds = ["x"]', "sweep.kinds: unknown flow kind 'x'"),
                           ('param = "tau"\nvalues = [1]', "sweep.param: must be a dotted config key"),
                           ('values = [1]', "sweep.param: missing required key")):
        bandit_config.write_text(BANDIT + "\n[sweep]\n" + table + "\n")
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            sweep.plan(bandit_config, out=tmp_path)


def test_nothing_is_overwritten_without_force(tmp_path, bandit_config, capsys):
    out = tmp_path / "sw"
    args = ["sweep", str(bandit_config), "--param", "mdp.tau=1", "--out", str(out), "--quiet",
            "--set", "flow.t_end=0.2"]
    assert cli.main(args) == 0
    csv_before = (out / "sweep.csv").read_bytes()
    stamp = (out / "wasserstein" / "mdp.tau=1" / "history.csv").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "run directory wasserstein/mdp.tau=1 exists" in capsys.readouterr().err
    assert (out / "wasserstein" / "mdp.tau=1" / "history.csv").stat().st_mtime_ns == stamp
    # a sweep.csv alone also counts; --force overwrites
    assert cli.main([*args[:3], "mdp.tau=0.5", *args[4:]]) == 2
    assert "sweep.csv exists" in capsys.readouterr().err
    assert (out / "sweep.csv").read_bytes() == csv_before
    assert cli.main([*args, "--force"]) == 0


def test_workers_are_capped_by_the_cores():
    cores = os.cpu_count() or 1
    assert pool.workers_for(None, 100) == cores
    assert pool.workers_for(10 * cores, 100) == cores
    assert pool.workers_for(None, 1) == 1
    assert pool.workers_for(1, 100) == 1


def _children(pid):
    """pids of the live processes whose parent is ``pid`` and that run a multiprocessing worker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "X"  # a zombie ("Z") still counts: nobody reaped it


def test_ctrl_c_stops_the_sweep_and_leaves_no_workers(tmp_path, bandit_config):
    out = tmp_path / "sw"
    # long runs: tiny dt at small tau (each run would take minutes)
    proc = subprocess.Popen([sys.executable, "-m", "solver.cli", "sweep", str(bandit_config), "--out", str(out),
                             "--param", "mdp.tau=0.01,0.02,0.03", "--quiet", "--jobs", "2",
                             "--set", "flow.dt=1e-4", "--set", "flow.t_end=1e3", "--set", "actions.cells=400"],
                            cwd=ROOT, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("wasserstein/*/history.csv"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) == 2, "the two workers should be running"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert not [pid for pid in workers if _alive(pid)]
    _, rows = read_rows(out)
    assert [r["status"] for r in rows] == ["interrupted"] * 3


def test_a_run_rejected_in_its_worker_is_an_error_row_and_exit_1(tmp_path, bandit_config, capsys):
    # k = 1e308 overflows the user model's reward to -inf: only building the MDP (in the worker) finds that
    out = tmp_path / "sw"
    code = cli.main(["sweep", str(bandit_config), "--out", str(out), "--quiet", "--param", "mdp.params.k=1,1e308",
                     "--set", "mdp.model=tests.user_model:quadratic", "--set", "mdp.params={}",
                     "--set", "states.n=5", "--set", "flow.t_end=0.2", "--set", "actions.cells=32"])
    assert code == 1
    assert "mdp.model: the reward of 'tests.user_model:quadratic' is not finite" in capsys.readouterr().err
    _, rows = read_rows(out)
    assert [r["status"] for r in rows] == ["t_end", "error"]
    assert rows[1]["measured_rate"] == "" and not (out / rows[1]["run_dir"]).exists()
