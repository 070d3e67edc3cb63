# Two commands do everything on a fresh Debian machine (as root): `make run` and `make test`.
# Every target is idempotent: a second call skips what is already done.

VENV      := .venv
PY        := $(VENV)/bin/python
WPGFLOW   := $(VENV)/bin/wpgflow
SYSPY     := /usr/bin/python3
# libopenblas0-pthread: Debian's BLAS/LAPACK alternative, taken by numpy/scipy at load time (the reference BLAS
# that python3-numpy pulls in is ~8x slower on the kernel products and LU solves; benchmarks/bench_memory.py).
DEB_PKGS  := python3-dolfinx-real python3-scipy python3-matplotlib python3-pytest python3-tqdm python3-venv python3-pip \
             libopenblas0-pthread
SYS_CHECK := import dolfinx, scipy, matplotlib, tqdm, pytest, ensurepip

.PHONY: setup system-deps run test bench bench-scaling bench-memory meshes clean

setup: $(WPGFLOW)

# Debian's DOLFINx 0.5.2 is built against Debian's numpy/scipy: install them all from apt, never from pip.
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

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_lqr_1d.py

# Time per step and to gap 1e-8 vs states x action DOFs (1D and 2D), benchmarks/scaling.png, mpirun -n 1 vs 2.
bench-scaling: setup
	$(PY) benchmarks/bench_scaling.py

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
