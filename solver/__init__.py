"""wpgflow: finite-element solver for Wasserstein policy-gradient flows.

Data flows config -> model -> MDP -> Bellman solver <-> flow stepper -> diagnostics -> outputs/plots.
The equations and notation are those of ``shared/docs/math.md``; module docstrings cite its sections.
"""

import os

__version__ = "0.1.0"

#: Environment variables by which MPI launchers announce the number of ranks (read by :mod:`solver.parallel`).
LAUNCHER_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")

# One BLAS thread per MPI rank: K ranks times OpenBLAS's default of one thread per core would oversubscribe the
# cores. Set before numpy is imported, which is when OpenBLAS reads it; an explicit setting wins.
if any(int(v) > 1 for v in (os.environ.get(name, "") for name in LAUNCHER_SIZE_VARIABLES) if v.isdigit()):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
