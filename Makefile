# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv from requirements.txt if missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := data/synthetic
TASK := $(DATA)/Task900_SynthLiverTumor
export PYTHONHASHSEED := 0

.PHONY: demo improve grow experiments holdout lint test test-slow test-all venv data mlflow-ui bench bench-ema bench-asha-long clean

# The pinned packages, then medseg itself in editable mode (no sys.path edits in scripts, tests or benchmarks).
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

data: $(TASK)/metadata.json
$(TASK)/metadata.json: | venv
	$(PY) -m medseg.data.synthetic --out $(DATA)

# The main job: tune the default search space on the embedded dataset, promote a champion, write a report.
demo: venv data
	$(PY) tune.py --space search_spaces/default.yaml

# One scheduled step of the improvement loop (cron, CI): audit, skip if nothing changed, a warm study, the decision.
improve: venv data
	$(PY) tune.py --space search_spaces/default.yaml --improve

# The data grows: the embedded task rewritten with 20 more cases (its first 40 unchanged, byte for byte), then one
# step of the loop: a warm study judged against the champion re-evaluated on the validation cases neither trained on.
grow: venv data
	$(PY) -m medseg.data.synthetic --out $(DATA) --cases 60 --force
	$(PY) tune.py --space search_spaces/default.yaml --improve

# The numbered experiments (configs/exp_*.yaml) as one study: the same MLflow runs, champion rule and report.
experiments: venv data
	$(PY) tune.py --configs configs/exp_000_baseline.yaml configs/exp_001_aug_sched.yaml configs/exp_002_context_2p5d.yaml \
		configs/exp_003_crops_longer.yaml --space search_spaces/default.yaml --name experiments

# The champion on 40 cases of a twin drawn with another seed, which no run, trial or decision has seen:
# its masks (infer.py) scored and ranked among the twin's reference methods (eval.py --leaderboard).
# HOLDOUT_SEED=2 draws a third twin (data/holdout_seed2): a check of choices made while looking at the seed-1 one.
HOLDOUT_SEED ?= 1
HOLDOUT := $(if $(filter 1,$(HOLDOUT_SEED)),holdout,holdout_seed$(HOLDOUT_SEED))
holdout: venv
	test -e models/champion/checkpoint.pt || { echo "no champion yet: run make demo first" >&2; exit 2; }
	test -f data/$(HOLDOUT)/Task900_SynthLiverTumor/metadata.json || $(PY) -m medseg.data.synthetic --out data/$(HOLDOUT) --seed $(HOLDOUT_SEED)
	rm -rf runs/$(HOLDOUT) && $(PY) infer.py --ckpt models/champion/checkpoint.pt --input data/$(HOLDOUT)/Task900_SynthLiverTumor \
		--out runs/$(HOLDOUT)/champion > /dev/null
	$(PY) eval.py --config configs/holdout_synthetic.yaml --set name=$(HOLDOUT)_synthetic --set dataset.path=data/$(HOLDOUT) --predictions runs/$(HOLDOUT)/champion \
		--out runs/$(HOLDOUT)/eval --leaderboard

# ruff's rules in pyproject.toml (line length 120, the default checks, sorted imports).
lint: venv
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -m "not slow" --durations=25

test-slow: venv
	$(PY) -m pytest -q -m slow

test-all: venv
	$(PY) -m pytest -q

bench: venv data
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_cache_parallel.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_asha.py
	$(PY) benchmarks/bench_seed_spread.py
	$(PY) benchmarks/bench_eval_infer.py

# The ASHA and seed-spread benchmarks with a moving average of the weights validated (training.ema_decay).
bench-ema: venv data
	$(PY) benchmarks/bench_asha.py --set overrides.training.ema_decay=0.99 --out benchmarks/results/asha_vs_full_ema.json
	$(PY) benchmarks/bench_seed_spread.py --set training.ema_decay=0.99 --asha-results benchmarks/results/asha_vs_full_ema.json \
		--out benchmarks/results/seed_spread_ema.json

# ASHA against no early stopping with the learning rate fixed and 12-epoch trials, the space's own ASHA setting
# (grace 1, reduction factor 3: rungs at epochs 1, 3 and 9). The earlier run with rungs 2 and 6 added
# asha.grace_period=2 and wrote benchmarks/results/asha_vs_full_fixed_lr_12ep.json.
bench-asha-long: venv data
	$(PY) benchmarks/bench_asha.py --space search_spaces/fixed_lr.yaml --max-epochs 1 \
		--set overrides.training.epochs=12 asha.max_t=12 --out benchmarks/results/asha_vs_full_fixed_lr_12ep_g1.json

# MLflow UI over the embedded sqlite store, loopback only, one worker. MLflow 3.17 opens experiments on its GenAI
# overview: the URL below (or a click on "Model training") shows the runs table.
mlflow-ui: venv
	@echo "runs table: http://127.0.0.1:5000/#/experiments/<id>?workflowType=machine_learning (ids: Experiments page)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port 5000 --workers 1

clean:
	rm -rf cache runs .pytest_cache
