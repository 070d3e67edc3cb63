"""``wpgflow study``: refinement levels, observed orders, Richardson estimates and verdicts (issue 11)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from solver import study
from solver.cli import main

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"

TINY = """
[mdp]
model = "lqr"
gamma = 0.8
tau = 0.5
params = { A = 0.5, B = 0.5, q = 1.0, r = 1.0, sigma = 0.5 }

[states]
lower = -1.0
upper = 1.0
n = 9

[actions]
lower = -4.0
upper = 4.0
cells = 48

[flow]
dt = 0.2
t_end = 30.0
gap_tol = 1e-10
init = "gaussian"
init_mean = 0.3
init_std = 0.6

[output]
snapshots = 3
"""


def test_observed_order_and_richardson_are_exact_on_power_laws():
    for p in (1.0, 2.0):
        x = [1.0 + 0.3 * h ** p for h in (1.0, 0.5, 0.25)]
        order, rich = study.observed_order(*x, 2.0)
        assert order == pytest.approx(p, rel=1e-12)
        assert rich == pytest.approx(1.0, rel=1e-12)
    # oscillating differences: an order is reported but no Richardson estimate
    assert study.observed_order(1.0, 1.1, 1.05, 2.0)[1] is None
    # round-off differences: no order at all
    assert study.observed_order(1.0, 1.0 + 1e-15, 1.0, 2.0) == (None, None)


def synthetic(values_by_run: dict[str, float], verdicts: dict[str, str] | None = None):
    runs = [study.Run(name.split("-")[0], int(name.split("-")[1]), "", {}, Path(name), name, False)
            for name in values_by_run]
    plan = study.Plan(out=Path("."), levels=2, runs=runs, skipped={})
    results = [{"status": "converged", "rate": v, "rate_verdict": (verdicts or {}).get(n, "resolved")}
               for n, v in values_by_run.items()]
    return study.analyse(plan, results)


def test_verdicts_on_constructed_changes():
    # mesh 0.1%, dt 5%, domain 0: dt-sensitive only
    _, verdicts = synthetic({"base-0": 1.0, "mesh-1": 1.001, "dt-1": 1.05, "domain-1": 1.0})
    assert verdicts["rate"] == "dt-sensitive"
    _, verdicts = synthetic({"base-0": 1.0, "mesh-1": 1.001, "dt-1": 0.995, "domain-1": 1.0})
    assert verdicts["rate"] == "resolved to 0.5%"
    # the numbers agree but a run says its rate is not asymptotic: not resolved
    _, verdicts = synthetic({"base-0": 1.0, "mesh-1": 1.0, "dt-1": 1.0, "domain-1": 1.0}, {"base-0": "transient"})
    assert verdicts["rate"] == "resolved to 0% (runs say base: transient)"


def test_domain_refinement_keeps_h_and_the_base_states():
    plan = study.plan(EXPERIMENTS / "lqr_1d.toml", [], Path("/nonexistent/study"), levels=3)
    settings = {r.run_dir: r.setting for r in plan.runs}
    # [-6, 6] with 121 states, h = 0.1; the largest next-state mean is 0.9 * 6 + 0.5 * 6 = 8.4, + 4 sigma = 9.6:
    # level 1 makes room for it (x 1.6 > 1.5 -> 193 states on [-9.6, 9.6]), level 2 x 1.5 more (289 on [-14.4, 14.4])
    # rho stays uniform on the base states [-6, 6]: J = rho . V asks the same question on every domain
    rho = " states.rho_lower=-6.0 states.rho_upper=6.0"
    assert settings["domain-1"] == "states.lower=-9.6 states.upper=9.6 states.n=193" + rho
    assert settings["domain-2"] == "states.lower=-14.4 states.upper=14.4 states.n=289" + rho
    assert settings["mesh-2"] == "actions.cells=1024"
    assert settings["dt-1"] == "flow.dt=0.005"
    # a one-state model has no state domain: the axis is skipped and said so
    bandit = study.plan(EXPERIMENTS / "bandit_ou.toml", [], Path("/nonexistent/study"))
    assert "domain" in bandit.skipped and all(r.axis != "domain" for r in bandit.runs)


def test_tiny_study_end_to_end(tmp_path, capsys):
    # 9 states x 49 DOFs, dt = 0.2 (deliberately coarse in time) on the state interval [-1, 1] with sigma = 0.5
    # (the kernel loses a visible share at every state): the verdicts must name exactly those two axes
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "study"
    assert main(["study", str(config), "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    rows = study.read_csv(out)
    assert (out / "study.png").stat().st_size > 0
    verdict = {r["quantity"]: r["verdict"] for r in rows}
    # J* does not depend on dt at all and on the mesh only through the quadrature of the Gibbs normaliser;
    # the mean of V* over the base states moves by ~38% when the grid grows to [-1.5, 1.5]
    assert verdict["J_star"] == "domain-sensitive"
    j = {r["axis"]: r for r in rows if r["quantity"] == "J_star"}
    assert j["dt"]["change"] == 0.0
    assert abs(j["domain"]["change"]) > 0.1
    # the implicit-Euler rate 2 log(1 + dt ell)/dt moves by ~8% from dt = 0.2 to 0.1
    assert "dt-sensitive" in verdict["rate"] and "dt-sensitive" in verdict["predicted_rate"]
    r = {row["axis"]: row for row in rows if row["quantity"] == "predicted_rate"}
    ell = r["base"]["value"]  # invert 2 log(1 + dt ell)/dt at dt = 0.2, re-apply at dt = 0.1
    ell = math.expm1(0.1 * ell) / 0.2
    assert r["dt"]["value"] == pytest.approx(2 * math.log1p(0.1 * ell) / 0.1, rel=1e-9)  # same ell: same mesh
    assert set(study.STUDY_COLUMNS) <= set(rows[0])
    # nothing is overwritten without --force
    assert main(["study", str(config), "--out", str(out), "--jobs", "1", "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err
