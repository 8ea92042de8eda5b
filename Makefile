# Thin map from names to commands. Every target is .PHONY: the targets share their names with the
# paper folders, so without it `make flame` would say "up to date".
#   make flame DATA=ml-1m            make test  make test-fast     make data DATA=ml-100k
#   make flame DATA=amazon-toys ARGS="train.lr=3e-4 train.max_epochs=5"
#   make vlm2rec CONFIG=vlm2rec/configs/ml100k_tune.yaml   make results
# DATA is a dataset name in every target: <paper>/configs/$(DATA).yaml; CONFIG=<file> runs another config file.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=
CONFIG ?=
ARGS ?=
SEEDS ?= 1 2 3
EXTRAS ?= f3crec,vlm,plot,dev,fl,track

.PHONY: results setup test test-fast test-all test-transformers-min test-deploy gpu-check smoke f3crec-fab f3crec-deploy f3crec-sim data flame f3crec vlm2rec bench bench-flame bench-f3crec bench-vlm2rec \
        flame-compare f3crec-compare vlm2rec-compare flame-table clean-venv

setup: $(STAMP)

# Reinstall only when the dependency list changes. torch is pinned in pyproject.toml.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q -m "not gpu"

# The fast tier, for every change: all but the heavy tests (subprocess runs, launchers, kill-and-resume, the
# local hub, torch.compile) and the real-data ones; `make test` (CI) still runs everything.
test-fast: setup
	$(PY) -m pytest -q -m "not gpu and not heavy and not slow"

# Includes the @slow tests that read real data from REPRO_DATA (or ../shared/data).
test-all: setup
	REPRO_DATA=$${REPRO_DATA:-../shared/data} $(PY) -m pytest -q

# The VLM tests against the oldest transformers pyproject.toml allows (installed beside the venv, not into it).
TRANSFORMERS_MIN := 5.18.0
test-transformers-min: setup
	rm -rf build/transformers-min
	$(PY) -m pip install -q --no-deps -t build/transformers-min "transformers==$(TRANSFORMERS_MIN)" "tokenizers>=0.23.1,<0.24"
	PYTHONPATH=build/transformers-min $(PY) -m pytest -q -m "not gpu" tests/vlm2rec tests/common/test_copies.py

# One prepared GPU script: every gpu test, the benchmarks, then complete runs within the budget (tests/gpu_campaign.py).
# DRY=1 prints the plan and checks that every command line parses (no GPU needed; CI runs it).
gpu-check: setup
	$(PY) tests/gpu_campaign.py $(if $(DRY),--dry-run) $(ARGS)

smoke: setup
	$(PY) -m flame.main --config flame/configs/smoke.yaml $(ARGS)
	$(PY) -m f3crec.main --config f3crec/configs/smoke.yaml $(ARGS)
	$(PY) -m vlm2rec.main --config vlm2rec/configs/smoke.yaml $(ARGS)

data: setup
	@test -n "$(DATA)" || { echo "make data needs DATA=<dataset>, e.g. make data DATA=ml-100k (python -m common.prepare --help lists them)" >&2; exit 2; }
	$(PY) -m common.prepare $(DATA)

# DATA=<dataset> picks <paper>/configs/$(DATA).yaml in all three papers (CONFIG=<file> another config file);
# vlm2rec without either runs its defaults (the paper setting). flame prepares its registry dataset first;
# f3crec's data step is building its blocks, which its main does itself (cached; raw files fetched through
# common.prepare when missing).
CONFIG_OF = $(or $(CONFIG),$(if $(DATA),$(1)/configs/$(DATA).yaml))
flame f3crec: setup
	@test -n "$(DATA)$(CONFIG)" || { echo "make $@ needs DATA=<dataset>, e.g. make $@ DATA=$(if $(filter flame,$@),ml-1m,ml-100k) (or CONFIG=<file>)" >&2; exit 2; }
	$(if $(filter flame,$@),$(if $(filter-out smoke,$(DATA)),$(if $(DATA),$(PY) -m common.prepare $(DATA))))
	$(PY) -m $@.main --config $(call CONFIG_OF,$@) $(ARGS)

vlm2rec: setup
	$(PY) -m vlm2rec.main $(if $(call CONFIG_OF,vlm2rec),--config $(call CONFIG_OF,vlm2rec)) $(ARGS)

flame-compare f3crec-compare vlm2rec-compare: setup
	@test -n "$(DATA)$(CONFIG)" || { echo "make $@ needs DATA=<dataset> (or CONFIG=<file>)" >&2; exit 2; }
	$(PY) -m $(subst -compare,,$@).compare --config $(call CONFIG_OF,$(subst -compare,,$@)) $(ARGS) --seeds $(SEEDS)

# Every run under the run root ($$REPRO_RUNS, else runs/) in results.csv and one table per paper (<paper>.md),
# written into <run root>/results/ (OUT=<folder> elsewhere); run folders are only read.
results: setup
	$(PY) -m common.results $(if $(OUT),--out $(OUT)) $(ARGS)

# FLAME's results table as one batched program (flame/table.py): the five datasets x SEEDS x {SASRec, FLAME}, B2
# from the SASRec pairs; tables and curves into OUT (table.md in flame/README.md's format). RESUME=1 finishes a
# stopped table. SMOKE=1: the same program on the smoke config (synthetic data, seconds on a CPU; CI runs it).
flame-table: setup
	$(PY) -m flame.table $(if $(SMOKE),--configs flame/configs/smoke.yaml) --seeds $(SEEDS) --out $(or $(OUT),runs/flame/table$(if $(SMOKE),-smoke)) $(if $(RESUME),--resume) $(ARGS)

# F3CRec's Flower App (f3crec/flower/app) on stock Flower processes, through Flower's own CLIs (common/flower_ops.py):
# f3crec-fab bundles it (the FAB holds f3crec/ and common/); f3crec-deploy starts a SuperLink + NODES SuperNodes on
# 127.0.0.1 with a per-deployment CA, TLS and SuperNode authentication, runs the app with `flwr run` and stops every
# process by pid. RESUME=<run folder> resumes a run (its saved config, same NODES). By default (FLOWER_ARGS) every
# process runs in a user + network namespace of its own, so no other local process reaches the SuperLink; where user
# namespaces are blocked, FLOWER_ARGS= runs on the host's 127.0.0.1 (TLS + node auth only). test-deploy: slow tests.
FLOWER_ARGS ?= --private-network
FLOWER_APP = --app f3crec/flower/app --package f3crec --package common
FLOWER_ENV = REPRO_RUNS=$${REPRO_RUNS:-$(CURDIR)/runs} REPRO_CACHE=$${REPRO_CACHE:-$(CURDIR)/data/processed}

f3crec-fab: setup
	$(PY) -m common.flower_ops build $(FLOWER_APP) --out build/fab

f3crec-deploy: setup
	@test -n "$(DATA)" || { echo "make f3crec-deploy needs DATA=<dataset>, e.g. make f3crec-deploy DATA=smoke NODES=4" >&2; exit 2; }
	$(FLOWER_ENV) $(PY) -m common.flower_ops deploy $(FLOWER_ARGS) $(FLOWER_APP) --nodes $(or $(NODES),4) --report-key report \
	  --node-config 'partition-id={i} num-partitions={n}' \
	  --run-config '$(if $(RESUME),resume=true run-dir="$(abspath $(RESUME))",config="f3crec/configs/$(DATA).yaml" overrides="federation.nodes=$(or $(NODES),4) $(ARGS)")'

# The same app on Flower's simulation runtime (NODES virtual nodes on Ray): the fl-sim extra (Ray) is installed here
# the first time, not by `make setup`.
f3crec-sim: setup
	@$(PY) -c 'import ray' 2>/dev/null || $(PY) -m pip install -q -e '.[$(EXTRAS),fl-sim]'
	@test -n "$(DATA)" || { echo "make f3crec-sim needs DATA=<dataset>, e.g. make f3crec-sim DATA=smoke NODES=4" >&2; exit 2; }
	$(FLOWER_ENV) $(PY) -m common.flower_ops deploy --simulation $(FLOWER_APP) --nodes $(or $(NODES),4) --report-key report \
	  --run-config 'config="f3crec/configs/$(DATA).yaml" overrides="federation.nodes=$(or $(NODES),4) $(ARGS)"'

test-deploy: setup
	@$(PY) -c 'import ray' 2>/dev/null || $(PY) -m pip install -q -e '.[$(EXTRAS),fl-sim]'
	REPRO_FLOWER_DEPLOY=1 $(PY) -m pytest -q tests/f3crec/test_flower_deploy.py tests/f3crec/test_flower_sim.py

bench: bench-flame bench-f3crec bench-vlm2rec

bench-flame bench-f3crec bench-vlm2rec: setup
	$(PY) -m $(subst bench-,,$@).bench $(if $(DATA),--data $(DATA)) $(ARGS)

clean-venv:
	rm -rf $(VENV)
