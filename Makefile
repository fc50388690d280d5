# Two commands matter: `make demo` (the main job) and `make test`.
# Both create or update .venv by themselves: torch (pinned CPU wheel) first,
# then the package with its extras. Never torchvision.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench fastcomposer venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,report]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/multiconcept demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

# ToyWorld's FastComposer is built, not shipped: one CPU hour on 2 cores (resumable; re-run to continue).
# Same settings as benchmarks/fastcomposer_toyworld.py's L_loc model (no grayscale crops: on ToyWorld
# colour is the subject's identity, and its training captions leave colour to the crops). Then:
#   multiconcept compose 'a star <img> on a gray background' -s star.png:star_mask.png --model models/fastcomposer-toyworld
fastcomposer: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/multiconcept train-encoder --method fastcomposer --data toyworld \
		--out models/fastcomposer-toyworld --lr 1e-4 --batch-size 16 --steps 100000 --max-minutes 60 \
		--param checkpoint_every=200 --param aug_grayscale_p=0 --resume

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_foundation.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
