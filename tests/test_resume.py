"""Checkpoint, resume, extend and determinism (issue 13): a run stopped by SIGTERM and resumed equals the
uninterrupted run bit for bit (history.csv, solution.npz, rates.csv), for every flow kind; equal inputs give
byte-identical files.

The stop of the in-process tests is the one SIGTERM makes (:data:`solver.checkpoint.STOP`, set by an observer at a
chosen step), so they run in a second; one test sends a real SIGTERM to a ``wpgflow run`` subprocess.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from solver import checkpoint, cli, outputs, runner

ROOT = Path(__file__).resolve().parents[1]

TINY = """
[mdp]
model = "lqr"
gamma = 0.9
tau = 1.0
params = { A = 0.9, B = 0.5, q = 1.0, r = 0.5, sigma = 0.3 }
[states]
lower = -2.0
upper = 2.0
n = 5
[actions]
lower = -3.0
upper = 3.0
cells = 12
[flow]
dt = 0.02
t_end = 0.3
[output]
snapshots = 6
checkpoint_every = 4
"""


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The plots and the LSI bracket at the optimum (1.5 s per run, summary.json only) are not what is compared
    here: history.csv, solution.npz and rates.csv do not depend on them."""
    from solver import along_flow, plots

    monkeypatch.setattr(plots, "plot_run", lambda path: [])
    monkeypatch.setattr(along_flow, "optimum_summary", lambda problem, ell: {"lsi_bracket": None,
                                                                             "predicted_rate_bound": None})


def write_config(tmp_path: Path, **flow) -> Path:
    text = TINY
    for key, value in flow.items():
        text = re.sub(rf"^{key} = .*\n", "", text, flags=re.M)
        text = text.replace("[flow]\n", f"[flow]\n{key} = {json.dumps(value)}\n")
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def same_results(a: Path, b: Path) -> None:
    """history.csv, rates.csv and solution.npz of two run directories are identical, byte for byte."""
    assert (a / "history.csv").read_bytes() == (b / "history.csv").read_bytes()
    for name in ("solution.npz", "rates.csv", "density.xdmf"):
        if (a / name).exists() or (b / name).exists():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


class StopAt(runner.Observer):
    """Asks the run to stop after step ``step`` (as SIGTERM does; :class:`solver.checkpoint.StopRequest`), or, with
    ``at_once``, interrupts it there (as a second signal does: no checkpoint of that step)."""

    def __init__(self, step: int, at_once: bool = False):
        self.step, self.at_once = step, at_once

    def observe(self, row, state):
        if state is not None and state.step == self.step:
            if self.at_once:
                raise KeyboardInterrupt
            checkpoint.STOP.signum = signal.SIGTERM


def interrupted_run(monkeypatch, config: Path, out: Path, step: int, at_once: bool = False) -> int:
    original = runner.run_observers
    monkeypatch.setattr(runner, "run_observers", lambda *a, **k: original(*a, **k) + [StopAt(step, at_once)])
    try:
        return cli.main(["run", str(config), "--out", str(out), "--quiet"])
    finally:
        monkeypatch.setattr(runner, "run_observers", original)


KINDS = {
    "wasserstein": {},
    "wasserstein_adaptive": {"adaptive": True, "adapt_tol": 1e-4},
    "fisher_rao": {"kind": "fisher_rao"},
    "particles": {"kind": "particles", "particles": 200},
    "policy_iteration": {"kind": "policy_iteration", "t_end": 6.0},
    "gaussian_wpo": {"kind": "gaussian_wpo"},
    "wasserstein_exponential": {"integrator": "exponential"},
}


@pytest.mark.parametrize("case", sorted(KINDS))
def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch, capsys, case):
    """Stop after step 6 (between checkpoints 4 and 8: the stop writes its own), resume: identical files."""
    config = write_config(tmp_path, **KINDS[case])
    assert cli.main(["run", str(config), "--out", str(tmp_path / "full"), "--quiet"]) == 0
    part = tmp_path / "part"
    stop = 1 if case == "policy_iteration" else 6  # policy iteration converges in a few iterations
    assert interrupted_run(monkeypatch, config, part, stop) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"--resume {part}" in err and "partial results" in err
    summary = json.loads((part / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == stop
    assert len(outputs.history_rows(part)) == stop + 1
    assert cli.main(["plot", str(part)]) == 0  # what is there can be read
    assert cli.main(["run", "--resume", str(part), "--quiet"]) == 0
    assert json.loads((part / "summary.json").read_text())["status"] in ("t_end", "converged")
    same_results(tmp_path / "full", part)


def test_one_state_model_resumes_bit_for_bit(tmp_path, monkeypatch):
    """A bandit (one state): the WPG flow keeps the edge rates of its first potential (the generator is frozen);
    they are checkpointed, so the resumed dissipation column equals the uninterrupted one too."""
    config = tmp_path / "bandit.toml"
    config.write_text(TINY.replace('model = "lqr"', 'model = "bandit"').replace(
        "params = { A = 0.9, B = 0.5, q = 1.0, r = 0.5, sigma = 0.3 }", "params = { k = 1.0, center = 0.5 }").replace(
        "[states]\nlower = -2.0\nupper = 2.0\nn = 5\n", ""))
    assert cli.main(["run", str(config), "--out", str(tmp_path / "full"), "--quiet"]) == 0
    assert interrupted_run(monkeypatch, config, tmp_path / "part", 6) == 128 + signal.SIGTERM
    assert cli.main(["run", "--resume", str(tmp_path / "part"), "--quiet"]) == 0
    same_results(tmp_path / "full", tmp_path / "part")


def test_interrupted_at_once_resumes_from_the_last_periodic_checkpoint(tmp_path, monkeypatch):
    """A second signal (KeyboardInterrupt at step 6) leaves the checkpoint of step 4; history.csv has rows up to
    step 6; the resumed run (here of a directory as SIGKILL leaves it) drops rows 5 and 6, recomputes them, and
    equals the uninterrupted run."""
    config = write_config(tmp_path)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "full"), "--quiet"]) == 0
    part = tmp_path / "part"
    assert interrupted_run(monkeypatch, config, part, 6, at_once=True) == 130
    assert json.loads((part / "summary.json").read_text())["status"] == "interrupted"
    _, meta = outputs.read_checkpoint(part)
    assert meta["step"] == 4
    # what SIGKILL would have left: a summary that still says running, no solution.npz or rates.csv
    (part / "summary.json").write_text('{"status": "running"}')
    for name in ("solution.npz", "rates.csv", "density.xdmf"):
        (part / name).unlink()
    assert cli.main(["run", "--resume", str(part), "--quiet"]) == 0
    same_results(tmp_path / "full", part)


def test_extend_continues_a_finished_run(tmp_path):
    """Run to t = 0.16, extend to 0.3: the history equals that of one run to 0.3 (the snapshot times differ: the
    schedule is geometric up to t_end)."""
    config = write_config(tmp_path)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "full"), "--quiet"]) == 0
    short = tmp_path / "short"
    assert cli.main(["run", str(config), "--out", str(short), "--quiet", "--set", "flow.t_end=0.16"]) == 0
    assert cli.main(["run", "--resume", str(short), "--extend", "0.3", "--quiet"]) == 0
    assert (short / "history.csv").read_bytes() == (tmp_path / "full" / "history.csv").read_bytes()
    assert "t_end = 0.3" in (short / "config.toml").read_text()
    with np.load(short / "solution.npz") as a, np.load(tmp_path / "full" / "solution.npz") as b:
        assert np.array_equal(a["pi_final"], b["pi_final"])


def test_equal_inputs_give_byte_identical_files(tmp_path):
    """Two runs of one config in one process (same BLAS threads): history.csv, solution.npz (written with fixed
    zip timestamps), rates.csv, density.xdmf and config.toml are equal byte for byte."""
    config = write_config(tmp_path)
    for name in ("a", "b"):
        assert cli.main(["run", str(config), "--out", str(tmp_path / name), "--quiet"]) == 0
    same_results(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "config.toml").read_bytes() == (tmp_path / "b" / "config.toml").read_bytes()


def test_sigterm_then_resume_equals_the_uninterrupted_run(tmp_path):
    """A real ``wpgflow run`` subprocess: SIGTERM once some history rows exist -> exit 143, summary status
    interrupted; ``--resume`` -> history.csv and solution.npz equal to an uninterrupted run's, bit for bit (both
    with one BLAS thread)."""
    config = write_config(tmp_path, t_end=8.0, gap_tol=0.0)  # 400 steps: long enough to be stopped mid-way
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    command = [sys.executable, "-c", "import sys; from solver import along_flow, cli, plots; plots.plot_run = "
               "lambda p: []; along_flow.optimum_summary = lambda p, e: {'lsi_bracket': None, 'predicted_rate_bound': "
               "None}; sys.exit(cli.main(sys.argv[1:]))", "run", "--quiet"]
    full, part = tmp_path / "full", tmp_path / "part"
    job = subprocess.Popen([*command, str(config), "--out", str(part)], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if (part / "history.csv").exists() and (part / "history.csv").read_text().count("\n") > 30:
            break
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err
    assert "SIGTERM" in err and "Traceback" not in err
    summary = json.loads((part / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 400
    both = f"; assert cli.main(['run', '--quiet', '--resume', {str(part)!r}]) == 0; sys.exit(cli.main(['run', " \
        f"'--quiet', {str(config)!r}, '--out', {str(full)!r}]))"  # one process: one start-up
    subprocess.run([sys.executable, "-c", command[2].replace("; sys.exit(cli.main(sys.argv[1:]))", both)], cwd=ROOT,
                   env=env, check=True)
    assert json.loads((part / "summary.json").read_text())["steps"] == json.loads((full / "summary.json").read_text())[
        "steps"] > summary["steps"]
    same_results(full, part)
