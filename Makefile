# The two commands of the README. Both create .venv and install pinned dependencies if needed.
.PHONY: train test lint setup gpu-wheels

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

# Pure-Python wheels the GPU image lacks, for scripts/gpu_check.sh (installed there with --no-index --no-deps
# --target). wandb and gradio are left out: the check does not import them (and gradio alone pulls dozens of
# packages). pytest and its requirements ride along in case the image has none (it runs the gpu tests).
GPU_WHEELS = hydra-core==1.3.8 omegaconf==2.3.1 torch-fidelity==0.4.0 webdataset==1.0.2 braceexpand==0.1.7 \
             pytest==8.4.2 iniconfig==2.3.1 pluggy==1.7.0 pygments==2.21.0
gpu-wheels:
	mkdir -p carry
	.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d carry $(GPU_WHEELS)
	.venv/bin/python -m pip wheel -q --no-deps -w carry antlr4-python3-runtime==4.9.3  # sdist only on PyPI
