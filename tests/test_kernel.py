"""The windowed Gaussian grid kernel against a brute-force dense tensor (math.md §2, §7.5.4)."""

import numpy as np
import pytest

from solver import mdp as mdp_module
from solver.mdp import GaussianGridKernel


def dense_kernel(states, mean, sigma):
    logits = -0.5 * ((states[None, None, :] - mean[..., None]) / sigma) ** 2
    T = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return T / T.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("dense_band", [True, False], ids=["dense-band", "windowed"])
def test_windowed_kernel_equals_dense_tensor(monkeypatch, dense_band):
    if not dense_band:  # the storage used for large state grids
        monkeypatch.setattr(mdp_module, "DENSE_BAND_BYTES", 0)
    rng = np.random.default_rng(0)
    states = np.linspace(-3, 3, 61)
    mean = rng.uniform(-5, 5, size=(61, 17))  # includes means far outside the grid
    kernel = GaussianGridKernel(states, mean, 0.2)
    T = dense_kernel(states, mean, 0.2)
    V = rng.normal(size=61)
    # entries beyond 9 sigma are < 3e-18 relative; the rest is round-off
    np.testing.assert_allclose(kernel.expect(V), T @ V, rtol=0, atol=1e-14)
    m = rng.uniform(size=(61, 17))
    np.testing.assert_allclose(kernel.policy_matrix(m).toarray(), np.einsum("ij,ijk->ik", m, T), rtol=0, atol=1e-14)
    assert kernel.width < states.size  # the window really is a window


def test_grid_gaussian_moments_at_round_off():
    """math.md §7.5.4: with h_s <= sigma/2 the discrete Gaussian's first two moments are exact to round-off."""
    states = np.linspace(-6, 6, 121)  # h = 0.1 = sigma / 3
    mean = np.array([[0.0123, -1.377, 2.5]])
    kernel = GaussianGridKernel(states, np.repeat(mean, 121, axis=0), 0.3)
    m1 = kernel.expect(states)[0]
    m2 = kernel.expect(states ** 2)[0]
    np.testing.assert_allclose(m1, mean[0], atol=1e-13)
    np.testing.assert_allclose(m2 - m1 ** 2, 0.09, rtol=1e-12)
