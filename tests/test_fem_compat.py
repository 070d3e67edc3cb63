"""solver/fem.py on every DOLFINx it supports: 0.5 (Debian 12) and 0.7 or later (Debian 13 has 0.9).

fem.py picks each API by feature detection, not by version: ``fem.functionspace`` or the old ``FunctionSpace``
constructor; ``scatter_reverse()`` or the old ``finalize()`` on the assembled matrix; ``dofmap.list`` as a 2D
array or as an ``AdjacencyList`` with ``.array``. The installed DOLFINx takes one branch of each; the tests below
also make it look like the other release (the other name only) and check that the same space comes out. The
truth is the closed-form P1 space of a uniform interval mesh (lumped weights ``h/2, h, ..., h, h/2``,
conductances ``omega = 1/h``) and, in 2D, the space built through the installed API's own names.
"""

from __future__ import annotations

import numpy as np
import pytest

from solver import fem

dolfinx_fem = pytest.importorskip("dolfinx.fem")


def same_space(a: fem.ActionSpace, b: fem.ActionSpace) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("coords", "weights", "edges", "conductance",
                                                                         "cells")) and a.bandwidth == b.bandwidth


def test_interval_space_is_the_closed_form_p1_space():
    """Uniform mesh of [-1, 2] with 6 cells, h = 1/2: DOFs in order, chain edges, omega = 1/h = 2, w = h/2, h."""
    space = fem.interval_space(-1.0, 2.0, 6)
    np.testing.assert_allclose(space.coords[:, 0], np.linspace(-1.0, 2.0, 7), rtol=0, atol=1e-15)
    # the assembled integrals of piecewise linears are exact up to round-off (a few ulp of 2)
    np.testing.assert_allclose(space.weights, [0.25] + [0.5] * 5 + [0.25], rtol=1e-14)
    np.testing.assert_allclose(space.conductance, 2.0, rtol=1e-14)
    assert space.is_chain and space.bandwidth == 1
    assert np.sort(space.cells, axis=1).tolist() == [[k, k + 1] for k in range(6)]


def test_the_other_function_space_constructor_gives_the_same_space(monkeypatch):
    """0.5/0.6 have only the constructor ``FunctionSpace(mesh, ("Lagrange", 1))``; 0.7+ have ``functionspace``."""
    baseline = fem.rectangle_space((0.0, 0.0), (1.0, 1.0), (3, 3))
    calls = []
    if hasattr(dolfinx_fem, "functionspace"):  # new API installed: look like 0.5 (no functionspace)
        real = dolfinx_fem.functionspace
        monkeypatch.delattr(dolfinx_fem, "functionspace")
        monkeypatch.setattr(dolfinx_fem, "FunctionSpace", lambda *args: calls.append(args) or real(*args))
    else:  # 0.5 installed: look like 0.7+ (functionspace beside the class)
        real = dolfinx_fem.FunctionSpace
        monkeypatch.setattr(dolfinx_fem, "functionspace", lambda *args: calls.append(args) or real(*args),
                            raising=False)
    assert same_space(fem.rectangle_space((0.0, 0.0), (1.0, 1.0), (3, 3)), baseline)
    assert len(calls) == 1 and calls[0][1] == ("Lagrange", 1)


class OtherReleaseMatrix:
    """An assembled matrix offering only the other release's name for accumulating ghost entries (same CSR)."""

    def __init__(self, A, calls: list):
        self.data, self.indices, self.indptr = A.data, A.indices, A.indptr
        self.name = "finalize" if hasattr(A, "scatter_reverse") else "scatter_reverse"
        setattr(self, self.name, lambda: calls.append(self.name))


def test_the_other_matrix_finalise_name_gives_the_same_space(monkeypatch):
    """0.5/0.6: ``MatrixCSR.finalize()``; 0.7+: ``scatter_reverse()``. Either one is called, once, before reading."""
    baseline = fem.interval_space(0.0, 1.0, 8)
    real, calls, made = dolfinx_fem.assemble_matrix, [], []

    def assemble_matrix(form):
        made.append(OtherReleaseMatrix(real(form), calls))
        return made[-1]

    monkeypatch.setattr(dolfinx_fem, "assemble_matrix", assemble_matrix)
    assert same_space(fem.interval_space(0.0, 1.0, 8), baseline)
    assert len(made) == 1 and calls == [made[0].name]
