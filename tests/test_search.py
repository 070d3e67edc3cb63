"""``wpgflow search`` (solver.search): the slowest double-well bandit is where Eyring-Kramers says, and the worst
certified margin of a second family is confirmed by a full run (theory.md §5.4, §10.1)."""

import csv
import json
import math
import tomllib
from pathlib import Path

from solver import cli, search

ROOT = Path(__file__).resolve().parent.parent


def test_rate_search_finds_the_eyring_kramers_corner(tmp_path):
    """tau in [0.15, 0.3], depth in [0.5, 1]: the rate (8 sqrt2 / pi) d exp(-d / tau) is slowest at (0.15, 1).
    The search must end within 2% of the box at that corner, with the rate within 15% of the formula (its
    O(tau / d) correction is -6% here: measured ratio 0.94), confirmed by a full run whose fitted rate is the
    predicted one."""
    out = tmp_path / "s"
    code = cli.main(["search", str(ROOT / "experiments" / "double_well_bandit.toml"), "--vary", "mdp.tau=0.15:0.3",
                     "--vary", "mdp.params.depth=0.5:1.0", "--objective", "rate", "--budget", "30", "--jobs", "1",
                     "--out", str(out), "--set", "actions.cells=100", "--set", "flow.dt=5", "--set", "flow.t_end=3000"])
    assert code == 0
    result = json.loads((out / "search.json").read_text())
    tau, depth = result["best"]["mdp.tau"], result["best"]["mdp.params.depth"]
    assert abs(tau - 0.15) <= 0.02 * 0.15 and abs(depth - 1.0) <= 0.02 * 0.5
    formula = 8 * math.sqrt(2) / math.pi * depth * math.exp(-depth / tau)
    assert abs(result["best_value"] / formula - 1) < 0.15
    with open(out / "search.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["evaluations"] >= 16
    assert min(float(r["value"]) for r in rows) == result["best_value"]
    c = result["confirm"]
    # implicit Euler at dt = 5 vs the continuous 2 ell: log(1 + 5 ell) / (5 ell) ~ 0.995; the fit is asymptotic
    assert abs(c["rate"] / c["predicted_rate"] - 1) < 0.01
    assert abs(c["predicted_rate"] / result["best_value"] - 1) < 0.01
    assert c["refinement_verdict"] == "resolved"
    best = tomllib.loads((out / "best.toml").read_text())
    assert best["mdp"]["tau"] == tau and best["mdp"]["params"]["depth"] == depth
    assert (out / "search.png").exists() and (out / "best" / "hypotheses.csv").exists()


def test_margin_search_confirms_the_certified_bound():
    """The second family (the multi-state double well, tau and depth): the worst certified margin found is above 1
    (no case breaks the bound of theory.md §10.1) and a full run at that point reports the same margin."""
    raw = tomllib.loads((ROOT / "experiments" / "double_well_1d.toml").read_text())
    for item in ("states.n=7", "actions.cells=32", "flow.t_end=10", "flow.dt=0.25", "output.snapshots=6"):
        search.config_module.apply_override(raw, item)
    vary = search.parse_vary(["mdp.tau=0.15:0.5", "mdp.params.depth=0.25:1.0"])
    best, rows = search.search(raw, vary, "margin", budget=16, jobs=1)
    assert all(r["status"] == "ok" for r in rows)
    assert 1.0 <= best["value"] == min(r["value"] for r in rows)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        c = search.confirm(raw, [k for k, _, _ in vary], best, "margin", Path(d))
    assert c["certified_status"] == "holds" and abs(c["certified_margin"] / best["value"] - 1) < 1e-9


def test_bad_vary_is_exit_2(tmp_path, capsys):
    cfg = str(ROOT / "experiments" / "double_well_bandit.toml")
    for vary in ("mdp.tau=0.3:0.1", "mdp.tau", "mdp.tua=0.1:0.2"):
        assert cli.main(["search", cfg, "--vary", vary, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("wpgflow: error:") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
