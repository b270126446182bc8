#!/usr/bin/env bash
# The post-hoc EMA ablation of the MNIST quickstart (docs/ablations/posthoc_ema/README.md), from the repository root.
set -euo pipefail
export PYTHONPATH="$PWD"
PY="${PYTHON:-.venv/bin/python}"
# 1. the quickstart, which tracks sigma_rel 0.05 and 0.10 (snapshots every 250 steps) beside its fixed EMA 0.995
"$PY" train.py experiment=mnist_quickstart run_name=posthoc_quickstart
# 2. every sigma_rel reconstructed and, with the fixed EMA's export, sampled at guidance 1 and 5 and scored
"$PY" scripts/tune.py run=runs/posthoc_quickstart 'sigma_rel=[0.04,0.06,0.08,0.10]' \
    'exports=[runs/posthoc_quickstart/export/model.pt]' 'axes.guidance_scale=[1,5]' num_samples=1000 \
    out_dir=runs/posthoc_tune ref=mnist_test num_ref=null accelerator=cpu
# 3. the sampling-noise check: one EMA again with other noise seeds
"$PY" scripts/tune.py run=runs/posthoc_quickstart 'sigma_rel=[0.04]' 'axes.guidance_scale=[1]' num_samples=1000 \
    out_dir=runs/posthoc_tune_seed1 ref=mnist_test num_ref=null accelerator=cpu seed=1
cp runs/posthoc_tune/results.csv runs/posthoc_tune/results.md runs/posthoc_tune/best.json docs/ablations/posthoc_ema/
cp runs/posthoc_tune/plots/*_vs_sigma_rel.png docs/ablations/posthoc_ema/
cp runs/posthoc_tune/sampler/tuned.yaml docs/ablations/posthoc_ema/tuned_sampler.yaml
