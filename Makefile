# make test  : set up .venv (torch, triton, the package and its CUDA extension when nvcc exists) and run the tests
# make bench : the same set-up, then on a GPU the benchmark sweep and the model zoo's profile on a
#              100k-patch bag; on a CPU the zoo's profile alone (see README.md, "Benchmarks")
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
	$(PY) -m pytest tests -q --durations=25

bench: $(STAMP)
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) -m milkernels.bench sweep; sweep=$$?; \
		$(PY) -m milkernels.bench profile --synthetic 100000 --model all; profile=$$?; \
		exit $$((sweep || profile)); \
	else \
		echo "make bench: no GPU here, so no kernel runs: kernel latency needs a GPU. On a 100k-patch synthetic bag,"; \
		echo "the model zoo as given against milkernels.swap: bytes saved for backward (exact, those of the GPU path)"; \
		echo "and FLOPs for every model, then CLAM_SB timed forward and forward+backward (CPU times of PyTorch code)."; \
		$(PY) -m milkernels.bench profile --synthetic 100000 --model all --repeats 0 --no-progress; counts=$$?; \
		$(PY) -m milkernels.bench profile --synthetic 100000 --model clam_sb --repeats 3; timed=$$?; \
		exit $$((counts || timed)); \
	fi

clean:
	rm -rf $(VENV) build milkernels/_C*.so *.egg-info
