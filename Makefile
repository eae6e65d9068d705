# The two commands a user needs: `make demo` (the embedded default pipeline) and `make test`.
# Both do all set-up themselves on a fresh machine and are safe to run twice.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test bench audit-noisy label-loop fashion-mnist setup clean uv-install

setup: $(STAMP)

# torch/torchvision pinned to the builds this project targets (found on the local disk where they are cached),
# and the project itself, editable, with its test extras. uv installs them from the indexes pip is set up with
# (pip.conf and PIP_* variables; every index on equal terms, as pip treats them) in about a seventh of pip's time;
# pip does it where uv cannot. Bytecode is compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is set,
# every process would otherwise compile torch's modules again (the suite's CPU time doubled).
PINNED := torch==2.14.1 torchvision==0.29.1
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv && $(MAKE) -s uv-install || \
	  $(PY) -m pip install -q --disable-pip-version-check $(PINNED) -e ".[test]"
	touch $@

PIPCFG = $$($(PY) -m pip config get global.$(1) 2>/dev/null | tr '\n' ' ')
uv-install:
	idx="$${PIP_INDEX_URL:-$(call PIPCFG,index-url)}"; extra="$${PIP_EXTRA_INDEX_URL:-$(call PIPCFG,extra-index-url)}"; \
	links="$${PIP_FIND_LINKS:-$(call PIPCFG,find-links)}"; cons="$${PIP_CONSTRAINT:-$(call PIPCFG,constraint)}"; \
	$(VENV)/bin/uv pip install -q --python $(PY) --index-strategy unsafe-best-match --compile-bytecode \
	  $${idx:+--index-url $$idx} $$(for u in $$extra; do echo --extra-index-url $$u; done) \
	  $$(for u in $$links; do echo --find-links $$u; done) $$(for c in $$cons; do echo --constraint $$c; done) \
	  $(PINNED) -e ".[test]"

fashion-mnist: $(STAMP)
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: $(FMNIST)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else \
	  $(PY) -m pipeline.data.fetch $(FMNIST); \
	fi

# The estimate first (a few timed batches, well under a minute), unless every stage is up to date.
demo: $(STAMP) fashion-mnist
	test -d .dvc || dvc init -q
	@dvc status -q 2>/dev/null || distill estimate -c params.yaml
	dvc repro
	@test -f runs/eval/results.md && cat runs/eval/results.md || true

# The label audit scored on known errors: the demo's data with 2 % of the training labels flipped on purpose
# (configs/demo-noisy.yaml, its own files under data/noisy and runs/noisy); prints precision and recall.
audit-noisy: $(STAMP) fashion-mnist
	distill ingest -c configs/demo-noisy.yaml --quiet
	distill teacher-fit -c configs/demo-noisy.yaml
	distill teacher -c configs/demo-noisy.yaml
	distill audit -c configs/demo-noisy.yaml --output runs/noisy/audit
	@cat runs/noisy/audit/planted.csv

# Fixing labels (docs/audit.md): the audit's rankings on 2 % confusable and uniform flips, and the loop (noisy, corrected
# by the audit's relabel file, clean) on 10 % of each; tables in runs/label-loop (rank.csv, loop.csv, loop-audit.csv).
label-loop: $(STAMP) fashion-mnist
	$(PY) -m bench.label_loop rank-confusable loop rank-uniform --seeds 0 1 2

# Two pytest-xdist workers, each test file whole on one (its module fixtures are built once), in the order
# tests/conftest.py collects them (the longest files first); slowest listed.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf data runs .pytest_cache
