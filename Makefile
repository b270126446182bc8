# The two commands of the README. Both create .venv and install pinned dependencies if needed.
.PHONY: train test lint setup

setup:
	@bash scripts/setup_env.sh

train: setup            ## train the default model (MNIST 32 px quickstart on CPU)
	.venv/bin/python train.py $(ARGS)

test:                   ## the full test suite, slow tests included (what CI runs); installs chromium if missing
	@bash scripts/setup_env.sh --test
	.venv/bin/python -m ruff check .
	.venv/bin/python -m pytest $(ARGS)

lint: setup
	.venv/bin/python -m ruff check .
