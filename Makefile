# make test  : set up .venv (torch, triton, the package and its CUDA extension when nvcc exists) and run the tests
# make bench : the same set-up, then the benchmark sweep (python -m milkernels.bench)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test bench install clean

$(STAMP): setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" triton pybind11 h5py numpy tqdm pytest pytest-benchmark matplotlib setuptools wheel
	$(PY) -m pip install -q --no-deps torchmil einops lin-mil nystrom-attention
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) -m milkernels.bench

clean:
	rm -rf $(VENV) build milkernels/_C*.so *.egg-info
