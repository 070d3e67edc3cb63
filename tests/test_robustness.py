"""Bad input and faults: every refusal is exit code 2 with one line naming the key or file, no traceback and
nothing written; a failure during a run is exit 1 with everything so far kept; a full disk leaves a summary that
says so; foreign callables named by a config are never called (issue 13).

The cases run in process (``solver.cli.main``) on a 5-state x 9-DOF LQR; most are refused before any mesh is
built, the rest within a second.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from solver import cli, config, outputs, runner

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
cells = 8
[flow]
dt = 0.01
t_end = 0.05
[output]
snapshots = 3
"""

USER = TINY.replace('model = "lqr"', 'model = "tests.user_model:quadratic"').replace(
    "params = { A = 0.9, B = 0.5, q = 1.0, r = 0.5, sigma = 0.3 }\n", "")


@pytest.fixture(autouse=True)
def no_plots(monkeypatch, request):
    """Runs here are about files and exit codes: their plots (seconds each) are not drawn. ``wpgflow plot`` on a
    damaged directory is tested for real (it refuses before drawing anything)."""
    from solver import along_flow, plots

    if "plot" not in request.node.name:
        monkeypatch.setattr(plots, "plot_run", lambda path: [])
    monkeypatch.setattr(along_flow, "optimum_summary", lambda problem, ell: {"lsi_bracket": None,
                                                                             "predicted_rate_bound": None})


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def refused(capsys, argv: list[str], *expected: str, out: Path | None = None) -> str:
    """``wpgflow argv`` exits 2 with one line on stderr containing ``expected``, no traceback, nothing written."""
    before = sorted(out.parent.iterdir()) if out is not None and out.parent.exists() else None
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("wpgflow: error: "), err  # no warnings, no traceback
    for text in expected:
        assert text in lines[0], (text, lines[0])
    if out is not None:
        assert not os.path.lexists(out), f"{out} was written"
        if before is not None:
            assert sorted(out.parent.iterdir()) == before
    return lines[0]


# --- the config: every key names itself and what is allowed ------------------------------------------------------

SET_CASES = {
    "typo_key": (["mdp.gama=0.5"], "mdp.gama", "did you mean 'gamma'"),
    "typo_flow_key": (["flow.dtt=0.1"], "flow.dtt", "did you mean 'dt'"),
    "typo_section": (["flwo.dt=0.1"], "flwo", "did you mean 'flow'"),
    "gamma_one": (["mdp.gamma=1"], "mdp.gamma", "0.99999"),
    "gamma_almost_one": (["mdp.gamma=0.999999999999999"], "mdp.gamma"),
    "gamma_negative": (["mdp.gamma=-0.1"], "mdp.gamma"),
    "gamma_string": (["mdp.gamma=high"], "mdp.gamma", "number"),
    "tau_zero": (["mdp.tau=0"], "mdp.tau"),
    "tau_tiny": (["mdp.tau=1e-300"], "mdp.tau", "1e-08"),
    "tau_nan": (["mdp.tau=nan"], "mdp.tau"),
    "tau_inf": (["mdp.tau=inf"], "mdp.tau"),
    "tau_bool": (["mdp.tau=true"], "mdp.tau"),
    "q_huge": (["mdp.params.q=1e308"], "mdp.params.q", "1e+12"),
    "A_huge": (["mdp.params.A=1e308"], "mdp.params.A"),
    "sigma_tiny": (["mdp.params.sigma=1e-300"], "mdp.params.sigma", "1e-12"),
    "sigma_zero": (["mdp.params.sigma=0"], "mdp.params.sigma"),
    "sigma_inf": (["mdp.params.sigma=inf"], "mdp.params.sigma"),
    "r_negative": (["mdp.params.r=-1"], "mdp.params.r"),
    "r_list_1d": (["mdp.params.r=[1, 2]"], "mdp.params.r"),
    "B_ragged": (["mdp.params.B=[[1, 2], [3]]"], "mdp.params.B"),
    "param_typo": (["mdp.params.sigm=0.3"], "mdp.params.sigm", "did you mean 'sigma'"),
    "model_typo": (["mdp.model=lqrr"], "mdp.model", "did you mean 'lqr'"),
    "model_empty": (['mdp.model=""'], "mdp.model"),
    "model_path_traversal": (["mdp.model=../../etc:passwd"], "mdp.model"),
    "dt_tiny": (["flow.dt=1e-9", "flow.t_end=10"], "flow.dt", "--force-size"),
    "dt_zero": (["flow.dt=0"], "flow.dt"),
    "dt_above_t_end": (["flow.dt=1", "flow.t_end=0.5"], "flow.dt"),
    "kind_unknown": (["flow.kind=langevin"], "flow.kind", "wasserstein"),
    "adaptive_fisher_rao": (["flow.kind=fisher_rao", "flow.adaptive=true"], "flow.adaptive"),
    "particles_2d": (["flow.kind=particles", 'actions.domain="disk"', "actions.lower=[0,0]"], "actions.lower"),
    "init_unknown": (["flow.init=peaked"], "flow.init"),
    "init_far_away": (["flow.init=gaussian", "flow.init_mean=100", "flow.init_std=0.01"], "flow.init_mean"),
    "init_std_zero": (["flow.init=gaussian", "flow.init_std=0"], "flow.init_std"),
    "snapshots_huge": (["output.snapshots=1000000000"], "output.snapshots", "10000"),
    "snapshots_one": (["output.snapshots=1"], "output.snapshots"),
    "checkpoint_negative": (["output.checkpoint_every=-1"], "output.checkpoint_every"),
    "cells_float": (["actions.cells=1e8"], "actions.cells", "integer"),
    "cells_one": (["actions.cells=1"], "actions.cells"),
    "lower_above_upper": (["actions.lower=4"], "actions.lower"),
    "domain_unknown": (["actions.domain=sphere"], "actions.domain"),
    "states_huge": (["states.n=200000", "actions.cells=200000"], "states.n", "GiB", "--force-size"),
    "states_2d_for_1d_model": (["states.n=[3000, 3000]", "states.lower=[-1, -1]", "states.upper=[1, 1]"], "states"),
    "states_n_zero": (["states.n=0"], "states.n"),
    "rho_outside_grid": (["states.rho_lower=-100"], "states.rho_lower", "within"),
    "rho_reversed": (["states.rho_lower=1", "states.rho_upper=0.5"], "states.rho_lower"),
    "rho_box_without_states": (["states.rho_lower=0.011", "states.rho_upper=0.012"], "states.rho_lower", "grid point"),
    "rho_list_for_1d_grid": (["states.rho_lower=[0, 0]"], "states.rho_lower"),
    "set_without_value": (["mdp.tau"], "--set"),
    "set_into_scalar": (["mdp.gamma.x=1"], "mdp.gamma"),
}


@pytest.mark.parametrize("case", sorted(SET_CASES))
def test_bad_setting_is_refused_naming_the_key(tmp_path, tiny, capsys, case):
    overrides, *expected = SET_CASES[case]
    out = tmp_path / "run"
    sets = [a for item in overrides for a in ("--set", item)]
    refused(capsys, ["run", str(tiny), "--out", str(out), "--quiet", *sets], *expected, out=out)


FILE_CASES = {
    "missing": (None, "config file not found"),
    "not_toml": ("[mdp\nmodel = ", "not valid TOML"),
    "not_utf8": (b"\xff\xfe\x00garbage", "cannot read"),
    "section_not_table": ("mdp = 3\n", "mdp"),
    "no_mdp": ("[flow]\ndt = 0.1\n", "mdp"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_config_file_is_refused_naming_the_file(tmp_path, capsys, case):
    content, expected = FILE_CASES[case]
    path = tmp_path / "c.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "run"
    refused(capsys, ["run", str(path), "--out", str(out), "--quiet"], expected, out=out)


# --- meshes: checked before DOLFINx reads them ---------------------------------------------------------------------

MESH = """<?xml version="1.0"?>
<Xdmf Version="3.0"><Domain><Grid Name="mesh" GridType="Uniform">
<Topology TopologyType="Triangle" NumberOfElements="2" NodesPerElement="3">
<DataItem Dimensions="2 3" NumberType="Int" Format="XML">{cells}</DataItem></Topology>
<Geometry GeometryType="XY"><DataItem Dimensions="4 2" NumberType="Float" Precision="8" Format="XML">
0 0 1 0 1 1 0 1</DataItem></Geometry></Grid></Domain></Xdmf>
"""

MESH_CASES = {
    "index_out_of_range": (MESH.format(cells="0 1 2 0 2 99"), "vertex 99"),
    "negative_index": (MESH.format(cells="0 1 2 0 2 -1"), "vertex -1"),
    "non_integer_index": (MESH.format(cells="0 1 2 0 2 1.5"), "integer"),
    "too_few_indices": (MESH.format(cells="0 1 2 0 2"), "5 indices"),
    "not_xml": ("<Xdmf><Domain>", "not a valid XDMF"),
    "no_topology": ('<?xml version="1.0"?><Xdmf><Domain><Grid Name="mesh"/></Domain></Xdmf>', "Topology"),
    "missing_file": (None, "not found"),
}


@pytest.mark.parametrize("case", sorted(MESH_CASES))
def test_bad_mesh_file_is_refused_before_dolfinx_reads_it(tmp_path, tiny, capsys, case):
    text, expected = MESH_CASES[case]
    mesh = tmp_path / "m.xdmf"
    if text is not None:
        mesh.write_text(text)
    path = tmp_path / "mesh.toml"
    path.write_text(TINY.replace("lower = -3.0\nupper = 3.0\ncells = 8", f'domain = "{mesh}"').replace(
        "B = 0.5", "B = [0.5, 0.5]"))
    out = tmp_path / "run"
    refused(capsys, ["run", str(path), "--out", str(out), "--quiet"], "actions.domain", str(mesh), expected, out=out)


def test_a_good_mesh_passes_the_check(tmp_path):
    mesh = tmp_path / "m.xdmf"
    mesh.write_text(MESH.format(cells="0 1 2 0 2 3"))
    assert config.inspect_xdmf(mesh) == (4, 2)


# --- user models: only registered factories are called; every failure names mdp.model ---------------------------

MODULES = {
    "broken_syntax.py": "def f(:\n",
    "raises_at_import.py": "raise RuntimeError('boom at import')\n",
    "exits_at_import.py": "import sys\nsys.exit(4)\n",
}

USER_CASES = {
    "os_system": ("os:system", "not a registered wpgflow model"),
    "builtins_exec": ("builtins:exec", "not a registered"),
    "shutil_rmtree": ("shutil:rmtree", "not a registered"),
    "subprocess_call": ("subprocess:call", "not a registered"),
    "unregistered_factory": ("tests.user_model:unregistered", "not a registered"),
    "no_such_module": ("no_such_module_xyz:f", "cannot import"),
    "no_such_function": ("tests.user_model:nothing_here", "no function"),
    "syntax_error": ("broken_syntax:f", "SyntaxError"),
    "raises_at_import": ("raises_at_import:f", "RuntimeError: boom at import"),
    "exits_at_import": ("exits_at_import:f", "SystemExit"),
    "factory_value_error": ("tests.user_model:raises_value_error", "ValueError: k must be small"),
    "factory_runtime_error": ("tests.user_model:raises_runtime_error", "RuntimeError"),
    "factory_exits": ("tests.user_model:exits", "SystemExit"),
    "not_a_model": ("tests.user_model:not_a_model", "must return solver.models.Model"),
    "reward_wrong_shape": ("tests.user_model:reward_wrong_shape", "shape (7,)"),
    "reward_string": ("tests.user_model:reward_string", "real numbers"),
    "reward_raises": ("tests.user_model:reward_raises", "ZeroDivisionError"),
    "reward_nan": ("tests.user_model:reward_nan", "not finite"),
    "reward_inf": ("tests.user_model:reward_inf", "not finite"),
    "dynamics_wrong_shape": ("tests.user_model:dynamics_wrong_shape", "dynamics"),
    "dynamics_raises": ("tests.user_model:dynamics_raises", "IndexError"),
    "dynamics_nan": ("tests.user_model:dynamics_nan", "not finite"),
    "sigma_inf": ("tests.user_model:sigma_inf", "sigma"),
    "sigma_string": ("tests.user_model:sigma_string", "sigma"),
    "bad_dims": ("tests.user_model:bad_dims", "action_dim"),
}


@pytest.mark.parametrize("case", sorted(USER_CASES))
def test_bad_user_model_is_refused_naming_mdp_model(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # importing the user module must not write __pycache__
    for name, source in MODULES.items():
        (tmp_path / name).write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    name, expected = USER_CASES[case]
    path = tmp_path / "user.toml"
    path.write_text(USER.replace("tests.user_model:quadratic", name))
    out = tmp_path / "run"
    refused(capsys, ["run", str(path), "--out", str(out), "--quiet"], "mdp.model", expected, out=out)


def test_user_model_with_wrong_params_names_mdp_params(tmp_path, capsys):
    path = tmp_path / "user.toml"
    path.write_text(USER.replace("[states]", "params = { kk = 1 }\n[states]"))
    refused(capsys, ["run", str(path), "--out", str(tmp_path / "run"), "--quiet"], "mdp.params", "kk")


def test_os_system_is_never_called(tmp_path, capsys):
    """A config naming ``os:system`` with a shell command is refused and the command never runs."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.toml"
    path.write_text(TINY.replace('model = "lqr"', 'model = "os:system"').replace(
        "params = { A = 0.9, B = 0.5, q = 1.0, r = 0.5, sigma = 0.3 }", f'params = {{ command = "touch {marker}" }}'))
    refused(capsys, ["run", str(path), "--out", str(tmp_path / "run"), "--quiet"], "mdp.model", "os:system")
    assert not marker.exists()


def test_registered_user_model_runs(tmp_path, capsys):
    path = tmp_path / "user.toml"
    path.write_text(USER)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] in ("t_end", "converged")


# --- the file system ------------------------------------------------------------------------------------------------

def test_out_below_a_file_is_refused(tmp_path, tiny, capsys):
    (tmp_path / "a_file").write_text("x")
    refused(capsys, ["run", str(tiny), "--out", str(tmp_path / "a_file" / "sub"), "--quiet"], "--out", "a_file")


def test_out_in_proc_is_refused(tiny, capsys):
    refused(capsys, ["run", str(tiny), "--out", "/proc/wpgflow_x/sub", "--quiet"], "--out", "/proc/wpgflow_x")


def test_out_that_is_a_file_is_refused(tmp_path, tiny, capsys):
    (tmp_path / "a_file").write_text("x")
    refused(capsys, ["run", str(tiny), "--out", str(tmp_path / "a_file"), "--quiet"], "--out", "not a directory")
    assert (tmp_path / "a_file").read_text() == "x"


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_read_only_out_is_refused(tmp_path, tiny, capsys):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "ro,size=64k"):
        pytest.skip("cannot mount a read-only tmpfs here (not root?)")
    try:
        refused(capsys, ["run", str(tiny), "--out", str(ro), "--quiet"], "--out", str(ro))
        refused(capsys, ["run", str(tiny), "--out", str(ro / "sub"), "--quiet"], "--out", str(ro / "sub"))
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_existing_run_dir_needs_force_and_a_held_lock_refuses_even_force(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", str(tiny), "--out", str(out), "--quiet"]) == 0
    history = (out / "history.csv").read_bytes()
    refused(capsys, ["run", str(tiny), "--out", str(out), "--quiet"], "--out", "--force")
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running wpgflow holds
        refused(capsys, ["run", str(tiny), "--out", str(out), "--quiet", "--force"], str(out), "another wpgflow run")
    finally:
        os.close(fd)
    assert (out / "history.csv").read_bytes() == history  # nothing overwritten


def test_force_unlinks_symlinks_and_never_writes_through_them(tmp_path, tiny, capsys):
    out, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.csv").write_text("keep me")
    assert cli.main(["run", str(tiny), "--out", str(out), "--quiet"]) == 0
    (out / "history.csv").unlink()
    (out / "history.csv").symlink_to(outside / "precious.csv")
    (out / "summary.json").unlink()
    (out / "summary.json").symlink_to(outside / "dangling.json")  # dangling
    refused(capsys, ["run", str(tiny), "--out", str(out), "--quiet"], "--force")  # a dangling link counts
    assert cli.main(["run", str(tiny), "--out", str(out), "--quiet", "--force"]) == 0
    assert (outside / "precious.csv").read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["precious.csv"]
    assert not (out / "history.csv").is_symlink() and not (out / "summary.json").is_symlink()


def test_lock_symlink_is_not_followed(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(tmp_path / "elsewhere")
    refused(capsys, ["run", str(tiny), "--out", str(out), "--quiet"], "--out", ".lock")
    assert not (tmp_path / "elsewhere").exists()


# --- damaged run directories: plot and lsi name the file ------------------------------------------------------------

@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "run"
    cfg = config.from_dict(__import__("tomllib").loads(TINY))
    runner.run_and_write(cfg, out)  # no plots: they are not what is tested here
    return out


def _damage(src: Path, dst: Path, how: str) -> None:
    shutil.copytree(src, dst)
    if how == "summary_truncated":
        text = (dst / "summary.json").read_text()
        (dst / "summary.json").write_text(text[: len(text) // 2])
    elif how == "summary_empty":
        (dst / "summary.json").write_text("")
    elif how == "summary_not_a_dict":
        (dst / "summary.json").write_text("[1, 2]")
    elif how == "solution_corrupt":
        (dst / "solution.npz").write_bytes(b"PK\x03\x04 not a zip at all")
    elif how == "solution_truncated":
        data = (dst / "solution.npz").read_bytes()
        (dst / "solution.npz").write_bytes(data[: len(data) // 2])
    elif how == "solution_missing_array":
        with np.load(dst / "solution.npz") as npz:
            arrays = {k: npz[k] for k in npz.files if k != "pi_star"}
        outputs.write_npz(dst / "solution.npz", arrays)
    elif how == "history_missing_column":
        lines = (dst / "history.csv").read_text().splitlines()
        (dst / "history.csv").write_text("\n".join(",".join(line.split(",")[:3]) for line in lines) + "\n")
    elif how == "history_garbage":
        with open(dst / "history.csv", "a") as f:
            f.write("1,2,x,4,5,6,7,8,9\n")
    elif how == "history_missing":
        (dst / "history.csv").unlink()
    elif how == "running_no_solution":  # a run killed with SIGKILL
        (dst / "solution.npz").unlink()
        (dst / "summary.json").write_text(json.dumps({"status": "running"}))


DAMAGE = {
    "summary_truncated": "summary.json",
    "summary_empty": "summary.json",
    "summary_not_a_dict": "summary.json",
    "solution_corrupt": "solution.npz",
    "solution_truncated": "solution.npz",
    "solution_missing_array": "pi_star",
    "history_missing_column": "history.csv",
    "history_garbage": "history.csv",
    "history_missing": "history.csv",
    "running_no_solution": "'running'",
}


@pytest.mark.parametrize("command", ["plot", "lsi"])
@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_run_dir_is_refused_naming_the_file(good_run, tmp_path, capsys, how, command):
    run_dir = tmp_path / "damaged"
    _damage(good_run, run_dir, how)
    refused(capsys, [command, str(run_dir)], DAMAGE[how])


def test_lsi_on_a_doctored_config_does_not_run_its_command(good_run, tmp_path, capsys):
    run_dir, marker = tmp_path / "doctored", tmp_path / "MARKER"
    shutil.copytree(good_run, run_dir)
    text = (run_dir / "config.toml").read_text()
    text = text.replace('model = "lqr"', 'model = "os:system"')
    text = text.replace("[mdp.params]", f'[mdp.params]\ncommand = "touch {marker}"')
    (run_dir / "config.toml").write_text(text)
    refused(capsys, ["lsi", str(run_dir)], "mdp.model", "not a registered")
    assert not marker.exists()


def test_plot_and_lsi_of_a_missing_dir(tmp_path, capsys):
    refused(capsys, ["plot", str(tmp_path / "nowhere")], "nowhere")
    refused(capsys, ["lsi", str(tmp_path / "nowhere")], "nowhere")


# --- resume and extend: refusals -----------------------------------------------------------------------------------

def test_resume_refusals(good_run, tmp_path, tiny, capsys):
    run_dir = tmp_path / "r"
    shutil.copytree(good_run, run_dir)
    refused(capsys, ["run", "--resume", str(run_dir), "--quiet"], "finished", "--extend")
    refused(capsys, ["run", "--resume", str(run_dir), "--extend", "0.01", "--quiet"], "--extend", "t_end")
    refused(capsys, ["run", "--resume", str(run_dir), "--set", "mdp.tau=2", "--quiet"], "--resume")
    refused(capsys, ["run", str(tiny), "--extend", "5", "--quiet"], "--extend", "--resume")
    refused(capsys, ["run", "--quiet"], "CONFIG")
    (run_dir / "checkpoint.npz").unlink()
    refused(capsys, ["run", "--resume", str(run_dir), "--extend", "1", "--quiet"], "checkpoint.npz")
    (run_dir / "rates.csv").unlink()
    (run_dir / "rates.csv").symlink_to(tmp_path / "outside.csv")
    refused(capsys, ["run", "--resume", str(run_dir), "--extend", "1", "--quiet"], "rates.csv", "symlink")
    assert not (tmp_path / "outside.csv").exists()
    refused(capsys, ["run", "--resume", str(tmp_path / "nowhere"), "--quiet"], "not a run directory")


# --- faults during a run --------------------------------------------------------------------------------------------

def test_numerical_failure_exits_1_and_keeps_the_rows(tmp_path, tiny, capsys, monkeypatch):
    """Non-finite values at step 3: exit 1, a message, history.csv with rows 0..2, summary status failed."""
    from solver.flows import wasserstein

    calls = {"n": 0}
    step = wasserstein.implicit_step

    def failing(*args, **kwargs):
        calls["n"] += 1
        masses = step(*args, **kwargs)
        return masses * np.nan if calls["n"] == 3 else masses

    monkeypatch.setattr(wasserstein, "implicit_step", failing)
    out = tmp_path / "run"
    assert cli.main(["run", str(tiny), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "run failed" in err and "non-finite" in err and "Traceback" not in err
    assert len(outputs.history_rows(out)) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "step 3" in summary["message"]


def test_summary_says_running_during_the_run(tmp_path, tiny, monkeypatch):
    seen = []

    class Peek(runner.Observer):
        def observe(self, row, state):
            if state is not None and state.step == 1:
                seen.append(json.loads((tmp_path / "run" / "summary.json").read_text())["status"])

    original = runner.run_observers
    monkeypatch.setattr(runner, "run_observers", lambda *a, **k: original(*a, **k) + [Peek()])
    assert cli.main(["run", str(tiny), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert seen == ["running"]


def test_disk_full_leaves_a_failed_summary_and_complete_files(tmp_path, tiny, capsys):
    """A 100 KiB tmpfs fills up during a 2000-step run: summary.json says failed; every other file is complete."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=100k"):
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    try:
        out = disk / "run"
        code = cli.main(["run", str(tiny), "--out", str(out), "--quiet", "--set", "flow.t_end=20", "--set",
                         "flow.gap_tol=0", "--set", "output.checkpoint_every=50"])
        err = capsys.readouterr().err
        assert code == 1, err
        assert "Traceback" not in err and "No space left" in err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "failed" and "No space left" in summary["message"]
        rows = outputs.history_rows(out)  # complete rows only, every one a number
        assert 10 < len(rows) < 2001
        assert (out / "history.csv").read_text().endswith("\n")
        for name in ("solution.npz", "checkpoint.npz"):
            if (out / name).exists():
                outputs.read_npz(out / name)  # complete if present
        config.load(out / "config.toml")
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError), outputs.atomic_file(target) as f:
        f.write(b"new, half")
        full()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_readable_but_inconsistent_run_dir_is_refused_by_lsi(good_run, tmp_path, capsys):
    """Files that parse but do not fit together: snapshot values of the wrong length (lsi --time)."""
    run_dir = tmp_path / "odd"
    shutil.copytree(good_run, run_dir)
    with np.load(run_dir / "solution.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["snapshots_V"] = arrays["snapshots_V"][:, :2]
    outputs.write_npz(run_dir / "solution.npz", arrays)
    refused(capsys, ["lsi", str(run_dir), "--time", "0"], "damaged run directory", "solution.npz")


def test_nul_byte_in_paths_is_refused(tmp_path, tiny, capsys):
    refused(capsys, ["run", str(tiny), "--out", str(tmp_path / "a\x00b"), "--quiet"], "--out")
    refused(capsys, ["run", str(tmp_path / "c\x00.toml"), "--quiet"], "cannot read config file")
