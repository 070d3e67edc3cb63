"""The hypothesis ledger (solver.regularity, solver.ledger, solver.interp_kernel): closed forms, a-priori bounds
on every shipped experiment, refinement verdicts and the low-noise growth of sup |Hess_a Q| (theory.md §5.4, §7.1,
§10.3)."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from solver import bellman, cli, config, ledger, models, oracles, regularity, runner
from solver.config import ConfigError
from solver.fem import interval_space
from solver.interp_kernel import InterpolationKernel
from solver.mdp import build_mdp
from solver.observers import Schedule

ROOT = Path(__file__).resolve().parent.parent
LQR = dict(A=0.9, B=0.5, q=1.0, r=0.5, sigma=0.3)

#: Tiny versions of the shipped experiments (a few seconds each on a loaded machine).
TINY = {
    "lqr_1d": ["states.n=13", "actions.cells=32", "flow.t_end=0.5", "flow.dt=0.05"],
    "double_well_1d": ["states.n=9", "actions.cells=40", "flow.t_end=2", "flow.dt=0.1"],
    "bandit_ou": ["actions.cells=48", "flow.t_end=0.5", "flow.dt=0.05"],
    "sweep_tau_double_well": ["states.n=5", "actions.cells=40", "flow.t_end=2"],
    "sweep_tau_lqr": ["states.n=13", "actions.cells=40", "flow.t_end=0.5"],
    "kink_low_noise": ["states.n=31", "actions.cells=32", "flow.t_end=0.5", "flow.dt=0.05",
                       "mdp.params.sigma=0.4"],
    "double_well_bandit": ["actions.cells=40", "flow.t_end=2"],
    "lqr_2d_action": ["states.n=5", "actions.cells=6", "flow.t_end=0.3", "flow.dt=0.1"],
    "lqr_2d_state": ["states.n=[5, 5]", "actions.cells=4", "flow.t_end=0.3", "flow.dt=0.1"],
    "ring_disk": ["states.n=3", "actions.resolution=\"coarse\"", "flow.t_end=0.3", "flow.dt=0.1"],
}


def tiny_run(name, out=None, extra=()):
    """Run the tiny version of ``experiments/<name>.toml`` with the ledger alone; return (problem, ledger)."""
    cfg = config.load(ROOT / "experiments" / f"{name}.toml", TINY[name] + ["output.snapshots=5", *extra])
    problem = runner.build(cfg)
    led = ledger.Ledger(problem, Schedule(cfg.output.snapshots, cfg.flow.dt, cfg.flow.t_end), out)
    result = runner.run(problem, [led])
    assert result.status in ("t_end", "converged"), result.message
    return problem, led


def test_every_shipped_experiment_is_listed():
    # a new experiment must get a tiny version here, so that the bound test below covers it
    assert {p.stem for p in (ROOT / "experiments").glob("*.toml")} <= set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_bounds_hold_at_every_snapshot(name, tmp_path):
    """theory.md §10.3 / §5.4: no measured value exceeds its a-priori bound, at any snapshot or state."""
    problem, led = tiny_run(name, tmp_path)
    rows = ledger.read(tmp_path / "hypotheses.csv")
    times = sorted({r["t"] for r in rows})
    # one row per snapshot and state, with the documented columns
    assert len(rows) == len(times) * problem.mdp.n_states >= 2 * problem.mdp.n_states
    with open(tmp_path / "hypotheses.csv") as f:
        assert tuple(next(csv.reader(f))) == ledger.COLUMNS
    assert ledger.violations(rows) == []
    checked = sum(math.isfinite(r["dQ_bound"]) for r in rows)
    if problem.mdp.space.dim == 1 and problem.mdp.states.ndim == 1:
        assert checked == len(rows)  # the kernel bounds exist for every 1D model
    assert all(math.isfinite(r["oscQ_bound"]) for r in rows)
    s = led.summary()
    assert s["ledger_bounds_hold"] is True
    assert [v["hypothesis"] for v in s["hypotheses"]] == ["regular solution", "Q-regularity uniform along iterates",
                                                         "uniform LSI of the Gibbs family",
                                                         "PL/dissipation inequality"]
    assert not any(v["verdict"].startswith("fails") for v in s["hypotheses"])


def test_a_planted_violation_is_caught(tmp_path):
    """The bound test above can fail: halve one bound (or double one measured value) and it reports it."""
    _, led = tiny_run("double_well_1d", tmp_path)
    rows = [dict(r) for r in led.rows]
    assert ledger.violations(rows) == []
    rows[7]["d2Q_bound"] = 0.5 * max(abs(rows[7]["d2Q_min"]), abs(rows[7]["d2Q_max"]))
    rows[11]["oscQ"] = 2.0 * rows[11]["oscQ_bound"]
    found = ledger.violations(rows)
    assert {(q, s) for q, _, s, _, _ in found} >= {("d2Q_min", rows[7]["state"]), ("oscQ", rows[11]["state"])}
    verdict = ledger.verdicts(rows, led.history, None, led.problem.J_star)[1]["verdict"]
    assert verdict.startswith("fails at t")


def test_lqr_closed_forms():
    """theory.md §7.1: Hess_a Q* = -2 alpha; semiconvexity of -Q*/tau (Lebesgue) = 2 alpha / tau; Fisher
    information of G*_s = N(-K s, Sigma) is 1 / Sigma. States [-9, 9] (h = sigma / 2: exact kernel moments),
    actions [-5, 5], tau = 0.1: at |s| <= 1.5 every next-state mean is far inside the grid and the Gibbs policies
    (std 0.24) far inside the action interval. (At tau = 1 the truncated action domain moves V* at the outer
    states by 5e-3, and through the dynamics Hess_a Q* at |s| <= 1.5 by 3e-6: the closed form is the untruncated
    MDP's.)"""
    tau = 0.1
    mdp = build_mdp(models.lqr(**LQR), np.linspace(-9, 9, 121), interval_space(-5, 5, 80), 0.9, tau)
    opt = bellman.soft_policy_iteration(mdp)
    exact = oracles.lqr_optimum(0.9, 0.5, 1.0, 0.5, 0.3, 0.9, tau)
    q = ledger.state_quantities(mdp, opt.Q, bellman.gibbs(mdp, opt.Q))
    inner = np.abs(mdp.states) <= 1.5
    # the divided differences are exact for quadratics; V* is the closed form to ~1e-10 there, amplified by
    # 1 / h_a^2 = 64 (measured 3e-9)
    assert np.max(np.abs(q["d2Q_min"][inner] + 2 * exact.alpha)) < 1e-6
    assert np.max(np.abs(q["d2Q_max"][inner] + 2 * exact.alpha)) < 1e-6
    assert np.max(np.abs(q["semiconvexity"][inner] - 2 * exact.alpha / tau)) < 1e-6
    # log-linear Fisher information of nodal values exp(quadratic): by summation by parts it is exactly
    # (1 / Sigma) x (lumped mass) = 1 / Sigma up to round-off and the 1e-30 tails (measured 4e-15)
    assert np.max(np.abs(q["fisher_info"][inner] * exact.Sigma - 1.0)) < 1e-6
    # the optimum is its own Gibbs policy: p / G = 1 and no relative Fisher information
    # (tau = 0.1: the tails of pi* underflow to 0 at some states, where the ratio is honestly 0)
    q_star = ledger.state_quantities(mdp, opt.Q, opt.p)
    assert (q_star["p_min"][inner] > 0).all()
    # (SPI's pi* is the Gibbs policy of the previous iterate: at the outer states its far tails differ by a few %)
    assert np.allclose(q_star["ratio_min"][inner], 1.0, atol=1e-9)
    assert np.allclose(q_star["ratio_max"][inner], 1.0, atol=1e-9)
    assert np.max(q_star["rel_fisher"][inner]) < 1e-12


def test_recovery_is_exact_for_quadratics():
    """1D (non-uniform nodes) and 2D (patch fits) recovery of u = 1 + 2 x - y + 3 x^2 - x y + 0.5 y^2."""
    a = np.sort(np.random.default_rng(1).uniform(-1, 1, 30))
    u = (1 + 2 * a - 3 * a ** 2)[None, :]
    assert np.allclose(regularity.recovered_gradient_1d(a, u), 2 - 6 * a, atol=1e-10)
    assert np.allclose(regularity.recovered_hessian_1d(a, u), -6.0, atol=1e-9)
    from solver.fem import rectangle_space

    space = rectangle_space((-1.0, -1.0), (1.0, 1.0), (4, 4))
    x, y = space.coords[:, 0], space.coords[:, 1]
    u2 = (1 + 2 * x - y + 3 * x ** 2 - x * y + 0.5 * y ** 2)[None, :]
    grad, hess = regularity.recovered_2d(regularity.patch_fits(space.coords, space.edges), u2)
    assert np.allclose(grad[0, :, 0], 2 + 6 * x - y, atol=1e-9)
    assert np.allclose(hess[0], [[6.0, -1.0], [-1.0, 1.0]], atol=1e-9)


def test_kernel_moments_exact(monkeypatch):
    """sd_x of the renormalised grid Gaussian: sigma inside the grid (h = sigma / 2: round-off), smaller at the
    edge where the grid cuts it; and every row's moments equal those of the kernel's own sparse matrix (the
    centred sums over its stored windows), also across chunks of states."""
    from solver.mdp import GaussianGridKernel

    states = np.linspace(-3, 3, 41)
    x = np.array([[0.0, 0.37, 2.9]])
    mean, var = regularity.kernel_moments(states, x, 0.3)
    assert abs(mean[0, 0]) < 1e-12 and abs(math.sqrt(var[0, 0]) - 0.3) < 1e-12
    assert math.sqrt(var[0, 2]) < 0.3 - 0.05  # cut by the grid end at 3
    means = np.random.default_rng(2).uniform(-3.5, 3.5, (7, 5))  # inside, near and beyond both grid ends
    T = GaussianGridKernel(states, means, 0.3, interpolate=False).matrix
    csr_mean = T @ states
    centred = (states[None, :] - csr_mean[:, None]) ** 2
    csr_var = np.asarray(T.multiply(centred).sum(axis=1)).ravel()
    monkeypatch.setattr(regularity, "MOMENT_CHUNK_BYTES", 8 * 5 * 41 * 2)  # two states per chunk
    mean, var = regularity.kernel_moments(states, means, 0.3)
    assert np.allclose(mean.ravel(), csr_mean, rtol=0, atol=1e-14)  # round-off of sums of 41 terms of |s| <= 3
    assert np.allclose(var.ravel(), csr_var, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("name,states", [("lqr_1d", 81), ("double_well_1d", 9)])
def test_refinement_converges_on_smooth_problems(name, states):
    """LQR and the double well are regular: every worst value converges as h -> 0 (cells x 1, 2, 4). (LQR needs
    h_s <= sigma / 2, here 0.15: on a coarse state grid the kernel rounds to the nearest state and Q*(s, .) gets
    sigma-scale features that do grow under action refinement.)"""
    cfg = config.load(ROOT / "experiments" / f"{name}.toml", [f"states.n={states}", "actions.cells=24"])
    ref = ledger.refinement(cfg, runner.build)
    for key in ("d2Q_abs", "dQ_sup", "fisher_info", "semiconvexity"):
        assert ref[f"{key}_verdict"].startswith("converging"), (key, ref[key], ref[f"{key}_verdict"])


def test_low_noise_hessian_grows_like_one_over_sigma():
    """kink model: the kink of V* reaches Q smoothed over sigma, so sup |Hess_a Q*| ~ gamma B^2 [V'] / (sigma
    sqrt(2 pi)) once the kink part dominates: the measured power in sigma is -1 (bar: within 0.25, the regular
    part and the grid shift it by ~0.05); at sigma = 0 with linear interpolation it grows like 1 / h_a."""
    values = []
    sigmas = (0.1, 0.05)
    for sigma in sigmas:
        states = np.linspace(-2, 2, int(round(4 / (sigma / 2))) + 1)  # h_s = sigma / 2
        mdp = build_mdp(models.kink(sigma=sigma), states, interval_space(-3, 3, 96), 0.9, 0.3)
        opt = bellman.soft_policy_iteration(mdp)
        q = ledger.state_quantities(mdp, opt.Q, opt.p)
        inner = np.abs(states) <= 1.0
        values.append(max(np.abs(q["d2Q_min"][inner]).max(), np.abs(q["d2Q_max"][inner]).max()))
    p = regularity.power_law(np.array(sigmas), np.array(values))
    assert -1.25 < p < -0.75, (values, p)
    hess = []
    for cells in (48, 96):
        mdp = build_mdp(models.kink(sigma=0.0), np.linspace(-2, 2, 41), interval_space(-3, 3, cells), 0.9, 0.3)
        opt = bellman.soft_policy_iteration(mdp)
        hess.append(np.abs(ledger.state_quantities(mdp, opt.Q, opt.p)["d2Q_max"]).max())
    assert regularity.power_law(np.array([6 / 48, 6 / 96]), np.array(hess)) < -0.75  # ~ h^-1 (measured -1.04)


def test_interpolation_kernel():
    """sigma = 0: linear interpolation is a Markov kernel exact for linear V; cubic (Catmull-Rom) is exact for
    quadratics inside the grid; P^pi is sum_j m_ij T_ij."""
    states = np.linspace(-2, 2, 21)
    x = np.array([[-1.93, -0.41, 0.0, 1.27], [0.55, 1.99, -2.5, 2.5]])
    lin = InterpolationKernel(states, x, 1)
    assert np.allclose(lin.matrix.sum(axis=1), 1.0) and lin.matrix.min() >= 0
    assert np.allclose(lin.expect(3 * states - 1), 3 * np.clip(x, -2, 2) - 1, atol=1e-12)
    cub = InterpolationKernel(states, x, 3)
    inside = (x > -1.8) & (x < 1.8)
    assert np.allclose(cub.expect(states ** 2 - states)[inside], (x ** 2 - x)[inside], atol=1e-12)
    m = np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    P = lin.policy_matrix(m).toarray()
    dense = lin.matrix.toarray().reshape(2, 4, 21)
    assert np.allclose(P, np.einsum("ij,ijk->ik", m, dense))
    assert np.allclose(lin.policy_matrix(m[1:], slice(1, 2)).toarray(), P[1:])


def test_sigma_zero_is_accepted_only_where_meant():
    assert models.build("kink", {"sigma": 0.0}).sigma == 0.0
    with pytest.raises(ConfigError, match="mdp.params.sigma"):
        models.build("lqr", {"sigma": 0.0})
    with pytest.raises(ConfigError, match="mdp.params.interpolation"):
        models.build("kink", {"interpolation": 2})


def test_hypotheses_command(tmp_path, capsys):
    """``wpgflow hypotheses RUN_DIR`` prints one line per snapshot and the four verdict rows; a directory without
    a ledger is exit 2 naming the file."""
    cfg = config.load(ROOT / "experiments" / "double_well_1d.toml", TINY["double_well_1d"] + ["output.snapshots=4"])
    summary, _ = runner.run_and_write(cfg, tmp_path / "run")
    assert summary["ledger_bounds_hold"] is True and len(summary["hypotheses"]) == 4
    assert cli.main(["hypotheses", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "a-priori bounds: all hold" in out and "PL/dissipation inequality" in out
    assert "uniform LSI of the Gibbs family: certified" in out  # from rates.csv
    (tmp_path / "run" / "hypotheses.csv").write_text("t,state,dQ_sup\n0.0,zero,1\n")  # damaged: exit 2 naming it
    assert cli.main(["hypotheses", str(tmp_path / "run")]) == 2
    assert "hypotheses.csv: damaged" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["hypotheses", str(tmp_path / "empty")]) == 2
    assert "hypotheses.csv" in capsys.readouterr().err
