# The two commands of the README: `make demo` (the main job) and `make test`.
# Both build a virtual environment in .venv from nothing: torch (the CUDA 13 build, so that
# the CUDA kernels compile here even without a GPU), the train/test/bench extras, then madfast
# itself with its C++/CUDA extension.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.madfast-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: demo test bench gpu-check install clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_SPEC) ninja cmake
	$(PY) -m pip install --no-build-isolation -e ".[train,test,bench]"
	touch $@

install: $(STAMP)

# The main job: trains a teacher on the embedded digits, distills a student data-free with MAD,
# prints both test accuracies and their ratio (about 2 minutes on 2 CPU cores).
demo: $(STAMP)
	$(PY) -m madfast demo

test: $(STAMP)
	$(PY) -m pytest tests -ra

# Every pytest-benchmark suite, a markdown table and a PNG chart of speed-ups vs eager.
bench: $(STAMP)
	$(PY) -m madfast bench --out benchmarks/results

# The prepared GPU run (at most TOTAL_S, default 540 s; no venv, no registries: the machine's python3
# and torch): in order of value, the build for this GPU, the whole MAD iteration, the headline check
# (the verified entries), every shape's correctness, the tests; everything into $(OUT) (the
# environment's OUT when set, as on a lent machine). benchmarks/gpu_recheck.sh reruns what failed.
OUT ?= benchmarks/results/gpu-check-$(shell date -u +%Y%m%d-%H%M%S)
gpu-check:
	bash benchmarks/gpu_check.sh $(OUT)

clean:
	rm -rf $(VENV) build *.egg-info madfast/_C*.so
