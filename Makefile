# The two README commands: `make run` (main job on the embedded default) and `make test` (test suite).
# `make run` builds results/tables/hast.csv: real, ptq, zeroq, gdfq, hast at W3A3/W4A4, 3 seeds (config/main.yaml,
# 26.1 min on 2 idle cores, measured in session 15; W3A3 alone: config/main_w3a3.yaml); `make run-full` the whole HAST table of config/config.yaml, reusing what `make run` made.
PYTHON ?= python3
CORES ?= 2

.PHONY: setup run run-full deploy test test-slow test-slurm lint bench clean

setup:
	@PYTHON=$(PYTHON) bash scripts/setup.sh

run: setup
	$(PYTHON) -m snakemake --cores $(CORES) results/tables/hast.csv --configfile config/main.yaml

# integer deployment of the main job's cells (docs/deploy.md): ONNX export, onnxruntime accuracy, latency
deploy: setup
	$(PYTHON) -m snakemake --cores $(CORES) results/tables/deploy.csv results/plots/deploy.png --configfile config/main.yaml

run-full: setup
	$(PYTHON) -m snakemake --cores $(CORES) results/tables/hast.csv

test: setup
	$(PYTHON) -m pytest -q

test-slow: setup
	$(PYTHON) -m pytest -q -m slow

# a one-node Slurm cluster on this machine (needs root; installs slurm-wlm + munge): tests/slurm/cluster.sh
test-slurm: setup
	$(PYTHON) -m pytest -q -m slurm

lint: setup
	ruff check . && $(PYTHON) -m snakemake --lint

bench: setup
	$(PYTHON) benchmarks/bench_qat_step.py

clean:
	rm -rf results .snakemake
