# Two commands do everything on a fresh Debian machine (as root): `make run` and `make test`.
# Every target is idempotent: a second call skips what is already done.

VENV      := .venv
PY        := $(VENV)/bin/python
WPGFLOW   := $(VENV)/bin/wpgflow
SYSPY     := /usr/bin/python3
# libopenblas0-pthread: Debian's BLAS/LAPACK alternative, taken by numpy/scipy at load time (the reference BLAS
# that python3-numpy pulls in is ~8x slower on the kernel products and LU solves; benchmarks/bench_memory.py).
DEB_PKGS  := python3-dolfinx-real python3-scipy python3-matplotlib python3-pytest python3-tqdm python3-venv python3-pip \
             libopenblas0-pthread python3-flake8 python3-meshio python3-h5py python3-threadpoolctl python3-numba
SYS_CHECK := import dolfinx, scipy, matplotlib, tqdm, pytest, ensurepip, flake8, meshio, h5py, threadpoolctl
# python3-threadpoolctl: one BLAS thread for small dense LUs and products (solver/parallel.py: 10x on the
# 121 x 121 LU of lqr_1d, where a second OpenBLAS thread costs more than it saves).
# python3-numba: the compiled kernels of solver/parallel.py (Thomas sweep, P^pi histogram, Q gather, edge rates),
# optional: without it (or with WPGFLOW_NUMBA=0) the pure-numpy paths run, tested to agree. Not in SYS_CHECK.
# python3-meshio (+ python3-h5py, which its XDMF reader imports): an independent XDMF reader for tests/test_interop.py.
# `wpgflow` on PATH: `make setup` links BINDIR/wpgflow to the venv's entry point when BINDIR is writable (root).
BINDIR    := /usr/local/bin

.PHONY: setup system-deps run test lint bench bench-peers bench-scaling bench-memory bench-mpi meshes clean

setup: $(WPGFLOW)
	@if [ -w $(BINDIR) ]; then \
	  ln -sfn $(CURDIR)/$(WPGFLOW) $(BINDIR)/wpgflow; \
	  echo "wpgflow is on PATH: $(BINDIR)/wpgflow -> $(CURDIR)/$(WPGFLOW)"; \
	else \
	  echo "$(BINDIR) is not writable: run 'source $(CURDIR)/$(VENV)/bin/activate' to put wpgflow on PATH"; \
	fi

# Debian's DOLFINx (0.5.2 on Debian 12, 0.9 on Debian 13: same package names) is built against Debian's numpy/scipy:
# install them all from apt, never from pip. `bash .ci/debian13` runs `make setup && make test` in a Debian 13 root.
system-deps:
	@{ $(SYSPY) -c "$(SYS_CHECK)" && dpkg -s libopenblas0-pthread; } >/dev/null 2>&1 || { \
	  echo "installing Debian packages: $(DEB_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEB_PKGS); }

$(WPGFLOW): setup.cfg pyproject.toml | system-deps
	@test -x $(PY) || $(SYSPY) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --no-index -e .
	@touch $(WPGFLOW)

run: setup
	$(WPGFLOW) run experiments/lqr_1d.toml --force
	@echo "next: wpgflow plot runs/lqr_1d (redraw the plots), wpgflow animate runs/lqr_1d (density.gif),"
	@echo "      wpgflow run experiments/ring_disk.toml (a 2D action domain), wpgflow --help (every command)"

test: setup lint
	$(PY) -m pytest -q

# pyflakes + pycodestyle (settings in setup.cfg [flake8])
lint: setup
	$(PY) -m flake8 solver tests benchmarks

# Interleaved ratios in one process (medians of A B A B pairs): the lqr_1d step against plain numpy, time to gap
# 1e-10 per flow kind, and the OU bandit against a numpy SG finite-volume code (and FPlanck / scikit-fem as whole
# processes when installed in benchmarks/.peers by `make bench-peers`).
bench: setup
	$(PY) benchmarks/bench_lqr_1d.py
	$(PY) benchmarks/bench_bandit.py

# FPlanck 0.2.2 (which needs numpy < 2) and scikit-fem in their own venv, never in .venv.
bench-peers:
	@test -x benchmarks/.peers/bin/python || $(SYSPY) -m venv benchmarks/.peers
	benchmarks/.peers/bin/pip install --quiet fplanck==0.2.2 "numpy<2" scikit-fem

# Time per step and to gap 1e-8 vs states x action DOFs (1D and 2D), benchmarks/scaling.png, mpirun -n 1 vs 2.
bench-scaling: setup
	$(PY) benchmarks/bench_scaling.py

# mpirun -n 1 against -n 2: the step interleaved in one mpirun job (with the machine's contention), then whole runs.
bench-mpi: setup
	$(PY) benchmarks/bench_mpi_steps.py lqr_1d
	$(PY) benchmarks/bench_mpi_steps.py lqr_2d_state
	$(PY) benchmarks/bench_mpi.py

# Peak memory and stage times of 101 x 101 states x 1013 action DOFs against the formula of solver/mdp.py.
bench-memory: setup
	$(PY) benchmarks/bench_memory.py

# Regenerate meshes/*.xdmf from meshes/*.geo (needs Debian's gmsh and python3-meshio; runs do not).
meshes:
	@command -v gmsh >/dev/null && $(SYSPY) -c "import meshio" 2>/dev/null || { \
	  echo "make meshes needs gmsh and python3-meshio: apt-get install gmsh python3-meshio"; exit 1; }
	$(SYSPY) meshes/generate.py

clean:
	rm -rf $(VENV) runs *.egg-info
	@if [ -L $(BINDIR)/wpgflow ] && [ "$$(readlink $(BINDIR)/wpgflow)" = "$(CURDIR)/$(WPGFLOW)" ]; then rm $(BINDIR)/wpgflow; fi
