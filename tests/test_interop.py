"""Outputs other tools read, checked with those tools: meshio (Debian's python3-meshio) on the XDMF files of a 1D
and a 2D run, clean XDMF times, sweep.csv columns, the progress observer off a terminal, and the command line's
help texts and ``-V``.

meshio has two XDMF readers: ``meshio.read`` opens a file with exactly one grid ("Only supports one grid right
now"), ``meshio.xdmf.TimeSeriesReader`` a temporal collection. No file is both, so a run writes the time series
``density.xdmf`` (TimeSeriesReader, ParaView's Xdmf3 readers, DOLFINx for its ``mesh`` grid) and the one-grid
``policy.xdmf`` (``meshio.read``, DOLFINx): each reader is tested on its file.
"""

import io
import math
import re
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from solver import cli, fem, observers, outputs, sweep

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
meshio = pytest.importorskip("meshio")  # Debian's python3-meshio (in the Makefile's DEB_PKGS)

RUNS = {  # a 1D and a 2D action domain, tiny; dt chosen so that the snapshot times carry float noise
    "1d": ["bandit_ou.toml", "--set", "actions.cells=32", "--set", "flow.dt=0.05", "--set", "flow.t_end=0.45",
           "--set", "output.snapshots=5"],
    "2d": ["lqr_2d_action.toml", "--set", "actions.cells=4", "--set", "states.n=5", "--set", "flow.dt=0.05",
           "--set", "flow.t_end=0.3", "--set", "output.snapshots=4"],
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, tmp_path_factory):
    config, *extra = RUNS[request.param]
    out = tmp_path_factory.mktemp(request.param) / "run"
    assert cli.main(["run", str(EXPERIMENTS / config), "--out", str(out), "--quiet", *extra]) == 0
    with np.load(out / "solution.npz") as npz:
        solution = {k: npz[k] for k in npz.files}
    return out, solution


def test_time_series_reader_opens_density_xdmf(run):
    out, sol = run
    written = outputs.xdmf_states(len(sol["states"]))
    rows = outputs.snapshot_rows(sol["snapshot_states"], written)
    with meshio.xdmf.TimeSeriesReader(out / "density.xdmf") as reader:
        points, cells = reader.read_points_cells()
        steps = [reader.read_data(k) for k in range(reader.num_steps)]
    coords = sol["actions"].reshape(len(sol["actions"]), -1)
    np.testing.assert_array_equal(points[:, :coords.shape[1]], coords)  # 17 digits written: exact
    assert cells[0].type == ("triangle" if coords.shape[1] == 2 else "line")
    assert len(steps) == sol["snapshots_t"].size
    for k, (t, point_data, _) in enumerate(steps):
        assert t == pytest.approx(sol["snapshots_t"][k], rel=1e-12, abs=1e-15)  # 12 significant digits
        for row, i in zip(rows, written):
            # 10 significant digits written
            np.testing.assert_allclose(point_data[f"density_s{i}"], sol["snapshots_pi"][k, row], rtol=1e-9, atol=1e-300)
            np.testing.assert_allclose(point_data[f"pi_star_s{i}"], sol["pi_star"][i], rtol=1e-9, atol=1e-300)


def test_meshio_read_opens_policy_xdmf(run):
    out, sol = run
    mesh = meshio.read(out / "policy.xdmf")
    coords = sol["actions"].reshape(len(sol["actions"]), -1)
    np.testing.assert_array_equal(mesh.points[:, :coords.shape[1]], coords)
    if coords.shape[1] == 2:
        np.testing.assert_array_equal(mesh.cells_dict["triangle"], sol["cells"])
    else:
        assert len(mesh.cells_dict["line"]) == len(coords) - 1
    for i in outputs.xdmf_states(len(sol["states"])):
        np.testing.assert_allclose(mesh.point_data[f"pi_final_s{i}"], sol["pi_final"][i], rtol=1e-9, atol=1e-300)
        np.testing.assert_allclose(mesh.point_data[f"pi_star_s{i}"], sol["pi_star"][i], rtol=1e-9, atol=1e-300)
    # both files carry a mesh DOLFINx reads back (solver.fem.mesh_space reads the grid named "mesh"), 2D only
    if coords.shape[1] == 2:
        for name in ("density.xdmf", "policy.xdmf"):
            assert fem.mesh_space(out / name).n_dofs == len(coords)


def test_no_single_xdmf_file_satisfies_both_meshio_readers(run):
    # why there are two files: meshio.read wants exactly one (uniform) grid in the domain, TimeSeriesReader a
    # temporal collection; each refuses the other's file. If a future meshio reads both, this fails, and
    # policy.xdmf can go.
    # (meshio.read itself prints the reader's error and calls sys.exit(1): the reader is called directly)
    out, _ = run
    with pytest.raises(meshio.ReadError, match="one grid"):
        meshio.xdmf.read(out / "density.xdmf")
    with pytest.raises(meshio.ReadError):
        meshio.xdmf.TimeSeriesReader(out / "policy.xdmf")


def test_xdmf_times_are_clean(run):
    out, sol = run
    values = [g.get("Value") for g in ET.parse(out / "density.xdmf").getroot().iter("Time")]
    assert values and all(len(re.sub(r"[^0-9]", "", v).lstrip("0")) <= 12 for v in values), values
    noisy = [repr(float(t)) for t in sol["snapshots_t"] if len(repr(float(t))) > 15]
    assert all(outputs.xdmf_time(float(v)) == v for v in values)
    if noisy:  # the case of the issue (0.15000000000000002): the file has the short form
        assert not any(v in values for v in noisy)


def test_xdmf_time_format():
    assert outputs.xdmf_time(0.1 + 0.05) == "0.15"  # 0.15000000000000002
    assert outputs.xdmf_time(0.0) == "0" and outputs.xdmf_time(1e-7) == "1e-07" and outputs.xdmf_time(60.0) == "60"


def test_sweep_csv_has_every_summary_number(tmp_path):
    summary = {"status": "converged", "message": "", "rate": 1.5, "rate_r2": 0.999, "predicted_rate": 1.49,
               "steps": 10, "t_final": 1.0, "wall_time_s": 0.5, "ell_min": 0.75, "J_star": -1.0, "gap_initial": 3.0,
               "gap_final": 1e-10, "monotone": True, "max_decrease": 0.0, "max_mass_error": 1e-15,
               "min_density": 1e-20, "setup_time_s": 0.1, "time_per_step_s": 0.04, "rate_status": "asymptotic"}
    row = {"kind": "wasserstein", "param": "mdp.tau", "value": 0.5, "run_dir": "wasserstein/mdp.tau=0.5",
           "status": "converged", "measured_rate": 1.5, "rate_r2": 0.999, "predicted_rate": 1.49, "steps": 10,
           "t_final": 1.0, "wall_time_s": 0.5} | {k: summary.get(k) for k in sweep.SUMMARY_COLUMNS}
    sweep.write_csv(tmp_path, [row])
    back = sweep.read_csv(tmp_path)[0]
    for key in ("ell_min", "gap_final", "max_mass_error", "J_star", "min_density"):
        assert back[key] == summary[key]
    assert back["monotone"] is True and back["rate_status"] == "asymptotic"
    assert back["predicted_rate_excited"] is None  # a summary without the key: an empty cell
    assert set(sweep.SUMMARY_COLUMNS) <= set(sweep.SWEEP_COLUMNS)


def test_progress_off_a_terminal_is_periodic_lines_with_an_honest_eta(monkeypatch):
    """A synthetic run: a fast transient (gap 1e2 -> 1e-1 in 10 steps), then rate 1 per step to gap_tol 1e-10.

    A wall clock of 1 s per step: the ETA printed at each line must be within 15% of the true time left.
    """
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])  # the observer reads time.perf_counter
    stream = io.StringIO()
    progress = observers.Progress(t_end=1000.0, gap_tol=1e-10, stream=stream, every=1e9)
    progress.start(types.SimpleNamespace(config=None))
    gaps = [1e2 * 10 ** (-0.3 * n) for n in range(10)] + [1e-1 * math.exp(-n) for n in range(1, 100)]
    steps = next(n for n, g in enumerate(gaps) if g <= 1e-10) + 1
    etas = []
    for n, gap in enumerate(gaps[:steps]):
        clock[0] = float(n)
        progress.observe({"gap": gap}, types.SimpleNamespace(t=float(n)))
        etas.append((n, progress.eta(clock[0], progress.fraction(float(n), gap))))
    progress.finish(types.SimpleNamespace(status="converged"))
    lines = stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 13 and all(line.startswith("flow: ") for line in lines), lines
    assert "100%" in lines[-1] and "converged" in lines[-1]
    late = [(n, eta) for n, eta in etas if n >= steps // 2 and eta is not None]
    assert late
    for n, eta in late:
        assert eta == pytest.approx(steps - 1 - n, rel=0.15, abs=1.0), (n, eta)


def test_every_argument_has_help_and_V_prints_the_version(capsys):
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"wpgflow {name} {action.dest}: no help text"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["-V"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("wpgflow ")


def readme_commands() -> list[tuple[str, str | None]]:
    """``(command, expected stderr or None)`` for every concrete ``wpgflow ...`` command of the README (synopses
    with upper-case placeholders such as ``CONFIG`` are skipped). A ``$ wpgflow ...`` line followed by a
    ``wpgflow: error: ...`` line is an example of bad input."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    found: list[tuple[str, str | None]] = []
    lines = text.splitlines()
    for k, line in enumerate(lines):
        if line.startswith("$ wpgflow "):
            following = lines[k + 1] if k + 1 < len(lines) else ""
            found.append((line[2:], following if following.startswith("wpgflow: error: ") else None))
    inline = re.findall(r"`(wpgflow [^`]+)`", text)  # (the Makefile's hints run the same commands)
    for command in inline:
        words = command.split()[1:]
        concrete = not re.search(r"(?<![-\w])[A-Z][A-Z_]*\b", command)  # CONFIG, RUN_DIR, X.toml: a synopsis
        if concrete and (len(words) >= 2 or words[0].startswith("-")) and all(c != command for c, _ in found):
            found.append((command, None))
    return found


def test_readme_commands_work_as_written(tmp_path, monkeypatch, capsys):
    """Run every concrete README command from a fresh directory (``runs/lqr_1d`` made first, as by ``make run``),
    on tiny grids: exit 0, or for a bad-input example exit 2 with the README's error line."""
    commands = readme_commands()
    assert any("plot runs/lqr_1d" in c for c, _ in commands) and any(e for _, e in commands)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").symlink_to(EXPERIMENTS)
    small = ["--set", "actions.cells=32", "--set", "states.n=9", "--set", "flow.t_end=0.2",
             "--set", "output.snapshots=4", "--quiet"]
    assert cli.main(["run", "experiments/lqr_1d.toml", *small]) == 0  # make run's run directory
    for command, error in commands:
        args = command.split()[1:]
        if args[0] == "run" and error is None:  # a mesh file domain has no actions.cells: the coarse mesh instead
            text = (tmp_path / args[1]).read_text()
            mesh = 'domain = "' in text and "rectangle" not in text
            args += [*(small[2:] + ["--set", 'actions.resolution="coarse"'] if mesh else small), "--force"]
        try:
            code = cli.main(args)
        except SystemExit as exc:  # --help, -V
            code = exc.code
        err = capsys.readouterr().err
        if error is None:
            assert code == 0, (command, err)
        else:  # one line naming the README's key (the wording after it is the message's owner's business)
            assert code == 2 and err.count("\n") == 1, (command, err)
            assert err.split(":")[:3] == error.split(":")[:3], (command, err, error)
