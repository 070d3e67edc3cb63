"""Rate verdicts (issue 11): asymptotic-regime detection, excited modes, boundary-affected states.

Independent truths: exact exponentials (fit_rate), exact Gaussian tails (kernel_loss), the Ornstein-Uhlenbeck
spectrum ``ell_k = k * kappa`` (theory.md §7.3: a centred start excites only even modes, so the gap decays at
``4 kappa`` instead of ``2 kappa``), the second-order expansion ``J* - J ~ (tau/2) sum W chi^2`` (normalisation of
the mode terms), and the LQR closed form of theory.md §7.1-§7.2 on held-out random parameters.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import ndtr

from solver import config as config_module, diagnostics, modes, runner, study
from solver.fem import interval_space
from solver.flows import fokker_planck


def exponential_gaps(rates, amplitudes, dt=0.01, t_end=40.0, floor=1e-11):
    t = np.arange(0.0, t_end, dt)
    gap = sum(a * np.exp(-r * t) for r, a in zip(rates, amplitudes))
    keep = gap >= floor
    return t[keep], gap[keep]


def test_fit_rate_single_exponential_is_asymptotic_and_exact():
    t, gap = exponential_gaps([3.0], [1.0])
    fit = diagnostics.fit_rate(t, gap)
    assert fit.status == "asymptotic"
    assert fit.rate == pytest.approx(3.0, rel=1e-10)  # an exact exponential: round-off only
    assert fit.local_last == pytest.approx(3.0, rel=1e-10)
    assert fit.local_spread < 1e-9


def test_fit_rate_two_modes_is_transient_with_last_local_rate():
    # a slow mode at 4e-3 of the fast one at t = 0 takes over inside the window [1e-10, 1e-5] (equal terms at
    # gap ~1e-7): the local rate falls from ~6 to ~4, so the fit (a mixture) must be reported transient
    t, gap = exponential_gaps([6.0, 4.0], [1.0, 4e-3])
    fit = diagnostics.fit_rate(t, gap)
    assert fit.status == "transient"
    assert 4.0 < fit.rate < 6.0
    assert fit.local_last == pytest.approx(4.0, rel=0.05)  # the last decade is dominated by the slow mode
    assert fit.local_spread > 0.1


def test_fit_rate_outside_window_is_never_a_silent_fallback():
    t, gap = exponential_gaps([2.0], [1.0], t_end=3.0)  # stops at gap ~2.5e-3, never enters [1e-10, 1e-5]
    fit = diagnostics.fit_rate(t, gap)
    assert fit.status == "transient"
    assert fit.window != diagnostics.RATE_WINDOW
    assert fit.rate == pytest.approx(2.0, rel=1e-8)


def test_dissipation_makes_the_settledness_test_immune_to_gap_round_off():
    # J* - J carries ~1e-13 |J| of round-off (J* and J from different solves: a systematic offset); with |J| ~ 50
    # that is 5e-12, 5% of a gap of 1e-10, and bends the last decade's local rate by ~2%. The dissipation column
    # decays at the same rate without cancellation, so the local rates measured on it settle.
    t, gap = exponential_gaps([3.0], [1.0], floor=1e-10)
    noisy = gap + 5e-12
    assert diagnostics.fit_rate(t, noisy).local_spread > diagnostics.RATE_SETTLED
    fit = diagnostics.fit_rate(t, noisy, dissipation=3.0 * gap)
    assert fit.status == "asymptotic"
    assert fit.rate == pytest.approx(3.0, rel=2e-3)  # the fit stays on the noisy gap: 5 decades average it out


def test_kernel_loss_is_the_exact_gaussian_tail():
    states = np.linspace(-1.0, 1.0, 5)  # h = 0.5: the grid stands for [-1.25, 1.25]
    means = np.array([[0.0, 1.25, -2.0]] * 5)
    loss = modes.kernel_loss(states, means, 0.5)
    assert loss[0, 0] == pytest.approx(2 * ndtr(-2.5), rel=1e-12)
    assert loss[0, 1] == pytest.approx(0.5 + ndtr(-5.0), rel=1e-12)
    assert loss[0, 2] == pytest.approx(1 - (ndtr(6.5) - ndtr(1.5)), rel=1e-12)
    grid2 = np.array([(x, y) for x in states for y in states])
    corner = modes.kernel_loss(grid2, np.full((25, 1, 2), 1.25), 0.5)
    kept = ndtr(0.0) - ndtr(-5.0)
    assert corner[0, 0] == pytest.approx(1 - kept ** 2, rel=1e-12)  # product of the two axes


def test_near_boundary_counts_mesh_edges():
    space = interval_space(0.0, 1.0, 10)
    near = modes.near_boundary(space, hops=3)
    assert np.flatnonzero(near).tolist() == [0, 1, 2, 3, 7, 8, 9, 10]


def run(raw: dict):
    problem = runner.build(config_module.from_dict(raw))
    start = modes.WindowStart()  # as in a CLI run: the modes are analysed where the gap enters the fit window
    result = runner.run(problem, [start])
    return problem, result, runner.summarise(problem, result, 0.0, runner.make_flow(problem), [start])


def ou_raw(init_mean, init_std):
    # OU bandit, kappa = 1, tau = 0.5: Gibbs N(0.5, 0.5), spectrum ell_k = k (theory.md §7.3)
    return {"mdp": {"model": "bandit", "gamma": 0.9, "tau": 0.5, "params": {"k": 1.0, "center": 0.5}},
            "actions": {"lower": -4.5, "upper": 5.5, "cells": 160},
            "flow": {"dt": 0.01, "t_end": 12.0, "gap_tol": 1e-10, "init": "gaussian", "init_mean": init_mean,
                     "init_std": init_std}}


def test_symmetric_ou_start_decays_at_the_slowest_excited_mode():
    # centred start with the wrong variance: only even modes, so the gap decays at 2 log(1 + 2 dt)/dt, twice
    # predicted_rate (the odd mode ell_1 = 1, not excited). The mesh is symmetric about the centre 0.5.
    problem, result, s = run(ou_raw(0.5, 0.3))
    assert s["slowest_excited_mode"] == 2
    assert s["predicted_rate_excited"] == pytest.approx(2 * math.log1p(0.02) / 0.01, rel=2e-3)  # O(h^2) mesh
    assert s["rate"] == pytest.approx(s["predicted_rate_excited"], rel=0.01)  # issue bar 5%; measured ~1e-3
    assert s["predicted_rate"] == pytest.approx(0.5 * s["predicted_rate_excited"], rel=0.01)
    assert s["rate_verdict"] == "resolved"
    # normalisation: (tau/2) sum W chi^2 equals J* - J to second order in the deviation (~1e-5 relative here;
    # 2% leaves room for the last rows' round-off in the gap)
    assert s["modes_linear_ratio"] == pytest.approx(1.0, abs=0.02)
    report = modes.analyse(problem.mdp, problem.optimum, result.final.p)
    assert report.terms.sum() == pytest.approx(report.gap, rel=0.02)


def test_asymmetric_ou_start_excites_the_slowest_mode():
    _, _, s = run(ou_raw(-0.5, 0.5))
    assert s["slowest_excited_mode"] == 1
    assert s["slowest_excited_rate"] == pytest.approx(s["predicted_rate"], rel=1e-12)  # the same eigenvalue
    # over the span the faster modes add ~1e-4 of the gap at its start: the excited modes' rate is mode 1's
    assert s["predicted_rate_excited"] == pytest.approx(s["predicted_rate"], rel=1e-3)
    assert s["modes_rate_ratio"] == pytest.approx(1.0, abs=1e-3)  # the linearised modes explain the decay
    assert s["rate"] == pytest.approx(s["predicted_rate"], rel=0.01)
    assert s["rate_verdict"] == "resolved"


def test_two_excited_modes_mix_over_the_window_and_the_modes_predict_the_mixture():
    # an almost centred start with the wrong variance: mode 2 (rate ~4) carries most of the gap when it enters
    # the window, mode 1 (rate ~2, from the small mean offset) emerges inside it, so the local rate falls from ~4
    # towards ~2 (ring_disk's situation, theory.md §10.2). The prediction from the modes at the window start must
    # follow the measured decay over the same span (the linearised flow is exact to second order there), the run
    # must say transient, and the predicted takeover gap must be where the measured local rate is halfway.
    problem, result, s = run(ou_raw(0.5 + 2e-3, 0.3))
    rates = (2 * math.log1p(0.01) / 0.01, 2 * math.log1p(0.02) / 0.01)  # ell_1 = 1, ell_2 = 2 (O(h^2) mesh)
    assert rates[0] * 1.05 < s["rate"] < rates[1] * 0.95  # a true mixture: 5% away from both modes
    assert s["rate_verdict"] == "transient"
    assert s["modes_rate_ratio"] == pytest.approx(1.0, abs=2e-3)  # measured 1e-4; 2e-3: the last rows' round-off
    assert s["slowest_excited_mode"] == 1 and s["slowest_excited_rate"] == pytest.approx(rates[0], rel=2e-3)
    t = np.array([r["t"] for r in result.rows])
    gap = np.array([r["gap"] for r in result.rows])
    local = -np.gradient(np.log(gap), t)
    halfway = gap[np.argmin(np.abs(local - 0.5 * sum(rates)))]
    assert s["slowest_excited_takeover_gap"] == pytest.approx(halfway, rel=0.3)  # a factor 1.3 in a gap of 1e-8


@pytest.mark.parametrize("cells", [40, 80])
def test_mesh_error_estimate_matches_the_ou_spectrum(cells):
    # OU bandit: the continuum gap of the slowest mode is exactly k = 1 (theory.md §7.3); the estimate from every
    # other node must match the actual error of the discrete gap (O(h^2): ~4x smaller at twice the cells), to
    # 10% of itself (the next order of the expansion; measured 2.8% and 0.7%)
    raw = ou_raw(-0.5, 0.5)
    raw["actions"]["cells"] = cells
    problem = runner.build(config_module.from_dict(raw))
    ell = diagnostics.generator_gaps(problem.mdp, problem.optimum.Q)[0]
    estimate = modes.mesh_error(problem, 0, 1)
    assert estimate == pytest.approx(ell / 1.0 - 1.0, rel=0.1)
    assert abs(estimate) > 1e-3  # a real, visible error at these meshes (measured 2.1e-2 and 5.2e-3)


def test_a_coarse_mesh_is_mesh_sensitive_not_resolved():
    # the same OU start on 24 cells: the run is asymptotic and its fit matches its own discrete mode to ~1e-4, but
    # that mode is 5.6% off the continuum (estimated 5.2%), so the verdict must say mesh-sensitive
    raw = ou_raw(-0.5, 0.5)
    raw["actions"]["cells"] = 24
    _, _, s = run(raw)
    assert abs(s["mesh_error_estimate"]) > 0.01
    assert s["rate_verdict"] == "mesh-sensitive"


def lqr_raw(params, gamma, tau):
    return {"mdp": {"model": "lqr", "gamma": gamma, "tau": tau, "params": params},
            "states": {"lower": -4.0, "upper": 4.0, "n": 33},
            "actions": {"lower": -6.0, "upper": 6.0, "cells": 128},
            "flow": {"dt": 0.02, "t_end": 40.0, "gap_tol": 1e-10, "init": "uniform"}}


@pytest.mark.parametrize("seed", [3, 11])
def test_lqr_verdict_is_never_silently_wrong_on_held_out_parameters(seed):
    # random LQR parameters (not the shipped ones), uniform start: either the run says "resolved" and the fit
    # is within 2% of the implicit-Euler closed form 2 log(1 + 2 alpha dt)/dt, or it says transient /
    # domain-sensitive. Measured on 18 sets (this generator at seeds 3, 5, 8, 11, 13, 21, and 12 more): fits off
    # by up to 75% were all flagged; seed 3 is off by 0.7% and seed 11 by 9%, both reported transient.
    rng = np.random.default_rng(seed)
    params = {"A": float(rng.uniform(0.3, 0.95)), "B": float(rng.uniform(0.4, 1.5)), "q": float(rng.uniform(0.5, 3)),
              "r": float(rng.uniform(0.2, 1.5)), "sigma": float(rng.uniform(0.5, 0.8))}
    _, _, s = run(lqr_raw(params, float(rng.uniform(0.6, 0.9)), float(rng.uniform(0.1, 1.0))))
    closed = s["oracle"]["rate_implicit_euler"]
    assert s["rate_verdict"] in modes.RATE_VERDICTS
    if s["rate_verdict"] == "resolved":
        assert s["rate"] == pytest.approx(closed, rel=0.02)
    else:
        assert s["rate_verdict"] in ("transient", "domain-sensitive", "mesh-sensitive")


def test_issue_lqr_edge_states_are_domain_sensitive_and_the_study_domain_fixes_it(tmp_path):
    # the issue's held-out LQR on a coarse action mesh: the gap ends at the edge states of the state grid, in
    # action tails whose transitions the grid cuts (fit ~6.2 against the closed form 10.55)
    params = {"A": 0.7, "B": 1.2, "q": 2.0, "r": 0.3, "sigma": 0.5}
    raw = lqr_raw(params, 0.8, 0.2)
    raw["actions"]["cells"] = 192
    raw["flow"]["dt"] = 0.01
    _, _, s = run(raw)
    closed = s["oracle"]["rate_implicit_euler"]
    assert abs(s["rate"] / closed - 1) > 0.2
    assert s["rate_verdict"] == "domain-sensitive"
    assert s["gap_state"] in (0, 32) and s["gap_state"] in s["boundary_affected_states"]
    assert s["predicted_rate_excited"] is None  # not in the linear regime: no mode prediction
    # `wpgflow study`'s domain level: room for every next-state mean of the base states (0.7 * 4 + 1.2 * 6 = 10,
    # + 4 sigma = 12: [-12, 12], 97 states) with rho kept on [-4, 4]. Measured: 10.4609, 0.86% below the closed
    # form (the rest is the O(h^2) mesh error of predicted_rate, 10.4497); 2% is the issue's bar
    config = tmp_path / "heldout.toml"
    config.write_text(config_module.to_toml(raw))
    domain = next(r for r in study.plan(config, out=tmp_path / "study").runs if r.axis == "domain")
    assert "states.lower=-12.0 states.upper=12.0 states.n=97" in domain.setting
    _, _, enlarged = run(domain.raw)
    assert enlarged["J_star"] == pytest.approx(s["J_star"], rel=1e-6)  # the same rho: the same question
    assert enlarged["rate"] == pytest.approx(closed, rel=0.02)


def test_an_action_domain_that_cuts_pi_star_is_domain_sensitive():
    # held-out LQR whose action interval [-1.2, 1.2] cuts the Gibbs policies: the cut Gaussians relax faster, the
    # fit is ~11% above the closed form, and the dominant mode has ~1.8% of its weight within 3 cells of the
    # boundary (measured), far above the 1e-3 share that flags it
    rng = np.random.default_rng(14)
    params = {"A": float(rng.uniform(0.3, 0.95)), "B": float(rng.uniform(0.4, 1.5)), "q": float(rng.uniform(0.5, 3)),
              "r": float(rng.uniform(0.2, 1.5)), "sigma": float(rng.uniform(0.5, 0.8))}
    raw = lqr_raw(params, float(rng.uniform(0.6, 0.9)), float(rng.uniform(0.1, 1.0)))
    raw["actions"] |= {"lower": -1.2, "upper": 1.2}
    _, _, s = run(raw)
    assert abs(s["rate"] / s["oracle"]["rate_implicit_euler"] - 1) > 0.05
    assert s["boundary_mode_share"] >= modes.BOUNDARY_MODE_SHARE
    assert s["rate_verdict"] == "domain-sensitive"
    assert "action boundary" in s["rate_verdict_reason"]


def test_mode_terms_normalisation_across_states():
    # a Gaussian start on a 17-state LQR ends in the linear regime: (tau/2) sum_s W_s chi^2_s with W_s =
    # d*_rho(s)/(1 - gamma) must equal J* - J (second-order PDL, theory.md §10.2); without the 1/(1 - gamma) the
    # ratio would be 0.2 here (gamma = 0.8)
    raw = lqr_raw({"A": 0.5, "B": 0.8, "q": 1.0, "r": 0.8, "sigma": 0.5}, 0.8, 0.5)
    raw["states"] |= {"lower": -2.0, "upper": 2.0, "n": 17}
    raw["actions"]["cells"] = 96
    raw["flow"] |= {"init": "gaussian", "init_mean": 0.2, "init_std": 0.5}
    problem, result, s = run(raw)
    assert s["modes_linear_ratio"] == pytest.approx(1.0, abs=0.02)
    report = modes.analyse(problem.mdp, problem.optimum, result.final.p)
    assert report.terms.sum() <= report.gap * (1 + 0.02)  # the computed modes are part of the full sum


def test_sparse_modes_agree_with_dense_eigh():
    # the shift-invert Lanczos path (2D meshes above DENSE_MODE_DOFS) against a dense eigh of the same matrix
    from solver.fem import rectangle_space
    import scipy.linalg as sla

    space = rectangle_space((-1.0, -1.0), (1.0, 1.0), (12, 12))
    assert space.n_dofs > modes.DENSE_MODE_DOFS
    x, y = space.coords[:, 0], space.coords[:, 1]
    g = (-(x - 0.2) ** 2 - 2 * y ** 2 + 0.3 * x * y)[None, :] / 0.3
    diag, coupling = fokker_planck.symmetric_generator(space, g, 0.3)
    ell, vectors = modes.state_modes(space, diag[0], coupling[0], 4)
    S = np.diag(diag[0])
    j, k = space.edges[:, 0], space.edges[:, 1]
    S[j, k] = S[k, j] = coupling[0]
    exact, exact_vectors = sla.eigh(S, subset_by_index=(0, 4))
    assert ell == pytest.approx(exact, rel=1e-8, abs=1e-10)  # Lanczos tol 1e-10
    overlap = np.abs(np.sum(vectors * exact_vectors, axis=0))
    assert overlap[:3] == pytest.approx(1.0, abs=1e-6)  # the slowest (non-degenerate) modes
