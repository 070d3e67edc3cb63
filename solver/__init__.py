"""wpgflow: finite-element solver for Wasserstein policy-gradient flows.

Data flows config -> model -> MDP -> Bellman solver <-> flow stepper -> diagnostics -> outputs/plots.
The equations and notation are those of ``shared/docs/math.md``; module docstrings cite its sections.
"""

__version__ = "0.1.0"
