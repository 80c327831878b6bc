# simoe_vision: two commands set everything up on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup data test test-all lint demo study clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps imagecorruptions-imaug==1.1.5
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP) data

# Fashion-MNIST, the embedded default dataset, comes from Debian's package dataset-fashion-mnist.
data:
	@if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
		echo "Fashion-MNIST: installed (dataset-fashion-mnist)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else \
		echo "Fashion-MNIST not found. Install it with 'sudo apt-get install dataset-fashion-mnist', or pass"; \
		echo "--data-dir to a folder holding the four idx .gz files (train-images-idx3-ubyte.gz, ...)."; \
	fi

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

lint: $(STAMP)
	$(BIN)/ruff check simoe_vision study tests *.py

# Train a small-image V-MoE with the similarity router on Fashion-MNIST (~10 min on 2 AVX512 CPU cores, ~17 min on
# AVX2-only ones); prints the results table and the run folder.
# The main job on the embedded default: train a small-image V-MoE with the similarity router on Fashion-MNIST,
# then evaluate it (clean, generated Fashion-MNIST-C, PGD/FGSM, routing) on a fixed subset of the test set.
DEMO_RUN ?= runs/demo
demo: setup
	@if [ -f $(DEMO_RUN)/last.pt ]; then $(BIN)/python train.py --resume $(DEMO_RUN); \
	else $(BIN)/python train.py -c configs/demo.yaml --output $(dir $(DEMO_RUN)) --experiment $(notdir $(DEMO_RUN)); fi
	$(BIN)/python evaluate.py --checkpoint $(DEMO_RUN) --suite clean,c,adv,routing --eval-subset 100 \
		--eps 1,4 --pgd-steps 5 --output $(DEMO_RUN)/eval

# The small-scale study behind docs/results.md: runs what fits in STUDY_BUDGET minutes, resumable across sessions.
STUDY_BUDGET ?= 150
study: setup
	$(BIN)/python -m study run --budget-minutes $(STUDY_BUDGET)
	$(BIN)/python -m study plan

clean:
	rm -rf $(VENV) .pytest_cache
