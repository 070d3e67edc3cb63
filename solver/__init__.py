"""wpgflow: finite-element solver for Wasserstein policy-gradient flows of entropy-regularised MDPs.

Data flows config -> model -> MDP -> Bellman solver <-> flow stepper -> diagnostics/observers -> outputs/plots.
The equations, schemes and closed forms are those of ``docs/theory.md``; module docstrings cite its sections.

The flat API a notebook needs (imported on first use, so ``import solver`` stays light)::

    from solver import load_config, build, run, summarise
    cfg = load_config("experiments/bandit_ou.toml", ["actions.cells=64", "flow.t_end=1.0"])
    problem = build(cfg)                 # mesh, MDP and the exact optimum pi* (soft policy iteration)
    result = run(problem)                # the flow of cfg.flow.kind until t_end or gap <= gap_tol
    result.rows[-1]["gap"]               # J* - J at the end; result.final.p is the last policy

``KINDS`` maps ``flow.kind`` to its implementation; ``states(kind, mdp, p0, t_end, dt=...)`` yields flow states
of any kind on any MDP; ``execute(cfg, out)`` is ``wpgflow run`` (it writes a run directory).
"""

import os

__version__ = "0.2.0"

#: Environment variables by which MPI launchers announce the number of ranks (read by :mod:`solver.parallel`).
LAUNCHER_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")

# One BLAS thread per MPI rank: K ranks times OpenBLAS's default of one thread per core would oversubscribe the
# cores. Set before numpy is imported, which is when OpenBLAS reads it; an explicit setting wins.
if any(int(v) > 1 for v in (os.environ.get(name, "") for name in LAUNCHER_SIZE_VARIABLES) if v.isdigit()):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

#: name -> (module, attribute) of the flat API.
_API = {"load_config": ("config", "load"), "build": ("runner", "build"), "run": ("runner", "run"),
        "summarise": ("runner", "summarise"), "execute": ("runner", "execute"), "KINDS": ("flows", "KINDS"),
        "states": ("flows", "states"), "make_flow": ("runner", "make_flow"), "Observer": ("observers", "Observer")}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'solver' has no attribute {name!r}")
    import importlib

    module, attribute = _API[name]
    return getattr(importlib.import_module(f"solver.{module}"), attribute)
