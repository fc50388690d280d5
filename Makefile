# Two commands matter: `make demo` (the main job) and `make test`.
# Both create or update .venv by themselves: torch (pinned CPU wheel) first,
# then every other package at the exact version and hash in requirements.lock,
# then this package without resolving anything. Never torchvision.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

LOCK := requirements.lock
PIP := $(BIN)/pip install -q --disable-pip-version-check
# the lock is resolved by uv against the torch pin (uv reads no pip configuration, so the
# pin's wheel folder is named here), for the interpreter CI and the developers run
UV := uv==0.13.9
LOCK_FLAGS := pyproject.toml --extra test --extra report --generate-hashes --no-emit-package torch \
	--python-version 3.11 --find-links /opt/wheels --quiet

.PHONY: demo test test-ui bench fastcomposer subject-diffusion venv lock upgrade-check clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) --require-hashes --no-deps -r $(LOCK)
	$(PIP) --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/multiconcept demo

# the linter and the import contracts (layers point one way: pyproject's [tool.importlinter]) first
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/lint-imports
	$(BIN)/python -m pytest tests

# the web page in a real browser: headless Chromium (Debian's package, installed here when missing:
# Playwright's own browser download is not reachable) driven by Playwright against a running
# `multiconcept ui`; screenshots of each tab in build/ui-screenshots/
test-ui: $(STAMP)
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	MULTICONCEPT_UI_TEST=1 $(BIN)/python -m pytest tests/test_ui_browser.py -s --durations=0

# ToyWorld's FastComposer is built, not shipped: one CPU hour on 2 cores (resumable; re-run to continue).
# Same settings as benchmarks/fastcomposer_toyworld.py's L_loc model (no grayscale crops: on ToyWorld
# colours are the subject's identity, and its training captions leave them to the crops). Then:
#   multiconcept compose 'a robot <img> on a gray background' -s robot.png:robot_mask.png --model models/fastcomposer-toyworld
fastcomposer: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/multiconcept train-encoder --method fastcomposer --data toyworld \
		--out models/fastcomposer-toyworld --lr 1e-4 --batch-size 16 --steps 100000 --max-minutes 60 \
		--param checkpoint_every=200 --param aug_grayscale_p=0 --resume

# ToyWorld's Subject-Diffusion, built the same way: one CPU hour (1 thread, so others can work), resumable.
# The paper's parts and dropout; lr 1e-4 with 100 warm-up steps (its 3e-5 and 1000 are for 450k steps).
# SD_PARAMS adds an ablation, e.g. SD_PARAMS='--param adapter=false' SD_OUT=models/subject-diffusion/no-adapter
# SD_MINUTES=20 (benchmarks/subject_diffusion_toyworld.py trains every ablation this way and scores them)
SD_OUT ?= models/subject-diffusion/full
SD_MINUTES ?= 60
SD_PARAMS ?=
subject-diffusion: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/multiconcept train-encoder --method subject-diffusion --data toyworld \
		--out $(SD_OUT) --lr 1e-4 --batch-size 16 --steps 100000 --max-minutes $(SD_MINUTES) \
		--param warmup_steps=100 --param checkpoint_every=100 $(SD_PARAMS) --resume

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_foundation.py

# Regenerate the lock on purpose (newest releases within pyproject's ranges), then run `make test`.
lock:
	test -x .lock-venv/bin/uv || ($(PY) -m venv .lock-venv && .lock-venv/bin/pip install -q $(UV))
	echo "$(TORCH)" > .lock-venv/torch.txt
	.lock-venv/bin/uv pip compile $(LOCK_FLAGS) -c .lock-venv/torch.txt -o $(LOCK)

# Drift check: the newest releases pyproject admits, in a throw-away venv; runs the suite and
# says which packages moved and what broke. Changes nothing in the project.
upgrade-check:
	$(PY) tools/upgrade_check.py

clean:
	rm -rf $(VENV) .lock-venv build src/*.egg-info .pytest_cache
