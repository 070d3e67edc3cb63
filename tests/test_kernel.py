"""The windowed Gaussian grid kernel against a brute-force dense tensor (theory.md §2, §7.5.4)."""

import numpy as np
import pytest

from solver import budget
from solver.mdp import GaussianGridKernel, GaussianGridKernel2D, product_grid


def dense_kernel(states, mean, sigma):
    """The renormalised grid Gaussian ``(N, M, N)`` by brute force; ``states (N,)`` or ``(N, 2)``, ``mean`` to match."""
    if states.ndim == 1:
        logits = -0.5 * ((states[None, None, :] - mean[..., None]) / sigma) ** 2
    else:
        logits = -0.5 * np.sum((states[None, None] - mean[:, :, None]) ** 2, axis=-1) / sigma ** 2
    T = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return T / T.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("dense_band", [True, False], ids=["dense-band", "windowed"])
def test_windowed_kernel_equals_dense_tensor(monkeypatch, dense_band):
    if not dense_band:  # the storage used for large state grids
        monkeypatch.setattr(budget, "DENSE_BAND_BYTES", 0)
    rng = np.random.default_rng(0)
    states = np.linspace(-3, 3, 61)
    mean = rng.uniform(-5, 5, size=(61, 17))  # includes means far outside the grid
    kernel = GaussianGridKernel(states, mean, 0.2)
    assert kernel.dense_band is dense_band  # the storage under test is the one taken
    T = dense_kernel(states, mean, 0.2)
    V = rng.normal(size=61)
    # entries beyond 9 sigma are < 3e-18 relative; the rest is round-off
    np.testing.assert_allclose(kernel.expect(V), T @ V, rtol=0, atol=1e-14)
    m = rng.uniform(size=(61, 17))
    np.testing.assert_allclose(kernel.policy_matrix(m).toarray(), np.einsum("ij,ijk->ik", m, T), rtol=0, atol=1e-14)
    assert kernel.width < states.size  # the window really is a window


def test_compiled_windowed_policy_matrix_equals_the_numpy_paths(monkeypatch):
    """The compiled ``P^pi`` (numba, when installed) is the windowed storage's bincount bit for bit, whole and on
    row blocks (MPI), and the dense band's einsum to round-off."""
    pytest.importorskip("numba")
    from solver import mdp as mdp_module, parallel

    rng = np.random.default_rng(2)
    states = np.linspace(-3, 3, 61)
    mean = rng.uniform(-5, 5, size=(61, 17))
    masses = rng.uniform(size=(61, 17))
    monkeypatch.setenv(parallel.NUMBA_VARIABLE, "0")
    band = GaussianGridKernel(states, mean, 0.2).policy_matrix(masses).toarray()  # 1037 pairs: the einsum
    monkeypatch.setattr(budget, "DENSE_BAND_BYTES", 0)
    kernel = GaussianGridKernel(states, mean, 0.2)
    windowed = kernel.policy_matrix(masses).toarray()
    monkeypatch.setenv(parallel.NUMBA_VARIABLE, "1")
    monkeypatch.setattr(mdp_module, "COMPILED_MIN_ENTRIES", 0)
    if parallel.compiled(mdp_module._windowed_policy, mdp_module.WINDOWED_SIGNATURE) is None:
        pytest.skip("numba is installed but cannot compile here")
    fast = kernel.policy_matrix(masses).toarray()
    np.testing.assert_array_equal(fast, windowed)  # the same products, summed over j in the same order
    np.testing.assert_allclose(fast, band, rtol=0, atol=1e-15)  # einsum sums in another order: round-off
    for rows in (slice(0, 30), slice(30, 61), slice(7, 8)):
        np.testing.assert_array_equal(kernel.policy_matrix(masses[rows], rows).toarray(), fast[rows])


def test_grid_gaussian_moments_at_round_off():
    """theory.md §7.5.4: with h_s <= sigma/2 the discrete Gaussian's first two moments are exact to round-off."""
    states = np.linspace(-6, 6, 121)  # h = 0.1 = sigma / 3
    mean = np.array([[0.0123, -1.377, 2.5]])
    kernel = GaussianGridKernel(states, np.repeat(mean, 121, axis=0), 0.3)
    m1 = kernel.expect(states)[0]
    m2 = kernel.expect(states ** 2)[0]
    np.testing.assert_allclose(m1, mean[0], atol=1e-13)
    np.testing.assert_allclose(m2 - m1 ** 2, 0.09, rtol=1e-12)


@pytest.mark.parametrize("stored", [True, False], ids=["stored-windows", "recomputed-windows"])
def test_2d_kernel_equals_dense_tensor(monkeypatch, stored):
    """The tensor-product kernel is the brute-force grid Gaussian, renormalised over the 2D grid, to round-off."""
    if not stored:  # the path of large grids: only the means are kept, windows are recomputed chunk by chunk
        monkeypatch.setattr(budget, "WINDOW_STORE_BYTES", 0)
        monkeypatch.setattr(budget, "KERNEL_CHUNK_BYTES", 1)  # one state per chunk: chunking must not matter
    rng = np.random.default_rng(1)
    x, y = np.linspace(-2, 2, 23), np.linspace(-1, 1.5, 17)  # unequal axes and spacings catch transposed axes
    states = product_grid(x, y)
    mean = rng.uniform(-3, 3, size=(states.shape[0], 9, 2))  # includes means outside the grid
    kernel = GaussianGridKernel2D((x, y), mean, 0.1)
    assert kernel.stored is stored
    assert kernel.width[0] < x.size and kernel.width[1] < y.size  # the windows really are windows
    T = dense_kernel(states, mean, 0.1)
    np.testing.assert_allclose(T.sum(axis=-1), 1.0, rtol=0, atol=1e-14)
    V, m = rng.normal(size=states.shape[0]), rng.uniform(size=(states.shape[0], 9))
    # weights beyond 9 sigma per axis are < 3e-18 relative; the rest is round-off of sums of up to N terms |V| < 4
    np.testing.assert_allclose(kernel.expect(V), T @ V, rtol=0, atol=1e-13)
    P = kernel.policy_matrix(m)
    np.testing.assert_allclose(P.toarray(), np.einsum("ij,ijk->ik", m, T), rtol=0, atol=1e-14)
    np.testing.assert_allclose(P.sum(axis=1).A1, m.sum(axis=1), rtol=1e-14)  # rows of T sum to 1
    rows = slice(40, 113)  # a rank's block under MPI: the same numbers, bit for bit
    assert np.array_equal(kernel.expect(V, rows), kernel.expect(V)[rows])
    assert np.array_equal(kernel.policy_matrix(m[rows], rows).toarray(), P.toarray()[rows])


def test_2d_grid_gaussian_moments_at_round_off():
    """theory.md §7.5.4 per axis: with h_s <= sigma/2 the mean and covariance sigma^2 I are exact to round-off."""
    x, y = np.linspace(-4, 3, 71), np.linspace(-3.5, 4, 76)  # h = 0.1 = sigma / 3; f +- 9 sigma inside
    states = product_grid(x, y)
    f = np.array([[0.0123, -0.377], [-1.1, 0.9], [0.5, 0.051]])
    kernel = GaussianGridKernel2D((x, y), np.repeat(f[None], states.shape[0], axis=0), 0.3)
    m1 = np.stack([kernel.expect(states[:, d])[0] for d in range(2)], axis=-1)
    np.testing.assert_allclose(m1, f, atol=1e-13)
    second = {(d, e): kernel.expect(states[:, d] * states[:, e])[0] - m1[:, d] * m1[:, e]
              for d in range(2) for e in range(d, 2)}
    np.testing.assert_allclose(second[0, 0], 0.09, rtol=1e-12)
    np.testing.assert_allclose(second[1, 1], 0.09, rtol=1e-12)
    np.testing.assert_allclose(second[0, 1], 0.0, atol=1e-13)  # isotropic noise: no correlation
