# make demo: set up everything (venv, dependencies, build), then run the main job.
# make test: set up everything, then run the quick test suite (<= 7 minutes on 2 cores; the tests marked slow,
#            longer accuracy and round-trip runs, are left to make test-slow; make test-all runs both).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this kind of machine's disk; elsewhere pip fetches it.
TORCH_SPEC ?= torch==2.13.0
export MAX_JOBS ?= 2

.PHONY: demo test test-slow test-all install bench lint cuda-check gpu-wheels clean

demo: install
	$(PY) -m llkern demo

test: install
	$(PY) -m pytest -q -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

test-all: install
	$(PY) -m pytest -q tests

install: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" -r requirements-dev.txt
	LLKERN_STRICT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import llkern; assert llkern.kernel_available('transport_penalty', 'cpu'), 'llkern._C did not build'"
	touch $@

bench: install
	$(PY) -m pytest -q bench --benchmark-columns=median,iqr,rounds

lint: install
	$(VENV)/bin/ruff check .

# Compile every torch-free CUDA kernel for sm_90a, and check that every CUDA binding compiles against
# the installed torch's headers (no GPU or CUDA torch needed: .ci/cuda_stubs stands in for the CUDA
# libraries' headers, which a CPU torch does not ship).
cuda-check: install
	@for f in csrc/cuda/*.cu; do \
	  echo "nvcc -arch=sm_90a $$f"; \
	  nvcc -std=c++17 -O3 -arch=sm_90a -Xptxas -warn-spills -c $$f -o /dev/null || exit 1; \
	done
	@includes="$$($(PY) -c "import sysconfig; from torch.utils.cpp_extension import include_paths; \
	  print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))")"; \
	cuda_include="$$(nvcc -x cu -E /dev/null -o /dev/null --dryrun 2>&1 | grep -o 'INCLUDES="-I[^"]*"' | head -1 \
	  | sed 's/INCLUDES="//; s/"$$//')"; \
	for f in csrc/bindings/*_cuda.cpp; do \
	  echo "g++ -fsyntax-only $$f"; \
	  g++ -std=c++20 -fsyntax-only $$includes $$cuda_include -I.ci/cuda_stubs $$f || exit 1; \
	done

# The peers that bench/gpu_check.sh's bench stage measures beside llkern, as wheels for the GPU machine
# (it has no network): carry .whl with the call; the stage installs them.
PEER_WHEELS ?= liger-kernel==0.8.5 cut-cross-entropy==25.1.1 inf-cl==1.2.1
gpu-wheels: install
	$(PY) -m pip download -q --no-deps -d .whl $(PEER_WHEELS)

clean:
	rm -rf build $(VENV) *.egg-info llkern/_C*.so
