#!/usr/bin/env bash
# Reproduce PixelFlow's class-conditional ImageNet 256x256 result (paper: FID 1.98, sFID 5.83, IS 282.1,
# precision 0.81, recall 0.60): 50k samples with dopri5 and CFG 2.4, evaluated against ADM's reference batch.
#
#   scripts/reproduce_imagenet256.sh [--dry-run] [CKPT_DIR] [REF_NPZ] [HYDRA_OVERRIDE ...]
#
# The published protocol: Dopri5, CFG 2.4, balanced labels, 16 images per device and batch, bf16 autocast
# + TF32 on GPU (precision=auto). Extra key=value arguments go to sample.py (devices=2, batch_size=8,
# precision=fp32, ...). The plan (images, devices, batch, precision, estimated time) is printed first;
# --dry-run prints it and exits without needing the inputs. A rerun resumes from the finished shards.
#
# Inputs (arguments win over environment variables, which win over the defaults):
#   CKPT_DIR  / $PIXELFLOW_CKPT_DIR   released checkpoint folder with model.pt + config.yaml   [checkpoints/PixelFlow-Class2Image]
#   REF_NPZ   / $ADM_REF              VIRTUAL_imagenet256_labeled.npz                          [data/VIRTUAL_imagenet256_labeled.npz]
#   $INCEPTION_WEIGHTS  torch-fidelity's weights-inception-2015-12-05-6726825d.pth (needed for IS; optional)
#   $OUT_DIR (runs/reproduce_imagenet256), $NUM_SAMPLES (50000), $PYTHON (.venv/bin/python), $DEVICE (auto)
#   $DOWNLOAD=1  fetch whatever is missing (needs network); never done otherwise.
#   $SAMPLER  a conf/sampler preset name [paper_dopri5], or a preset file DIR/sampler/NAME.yaml (scripts/tune.py writes
#             DIR/sampler/tuned.yaml); $PROTOCOL  the metric protocol [adm: ADM's evaluator arithmetic] or exact
# Missing inputs without DOWNLOAD=1 stop the script at once (exit 1) with what to download and where to put it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DRY_RUN=0; POSITIONAL=(); OVERRIDES=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -*) echo "[reproduce] unknown option $arg (known: --dry-run)" >&2; exit 2 ;;
    *=*) OVERRIDES+=("$arg") ;;
    *) POSITIONAL+=("$arg") ;;
  esac
done
CKPT_DIR="${POSITIONAL[0]:-${PIXELFLOW_CKPT_DIR:-$ROOT/checkpoints/PixelFlow-Class2Image}}"
REF="${POSITIONAL[1]:-${ADM_REF:-$ROOT/data/VIRTUAL_imagenet256_labeled.npz}}"
OUT_DIR="${OUT_DIR:-$ROOT/runs/reproduce_imagenet256}"
NUM_SAMPLES="${NUM_SAMPLES:-50000}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
DEVICE="${DEVICE:-auto}"
INCEPTION_WEIGHTS="${INCEPTION_WEIGHTS:-}"
SAMPLER="${SAMPLER:-paper_dopri5}"
PROTOCOL="${PROTOCOL:-adm}"
if [[ "$SAMPLER" == *.yaml ]]; then  # a preset file: its folder sampler/ goes on Hydra's search path
  if [[ ! -f "$SAMPLER" || "$(basename "$(dirname "$SAMPLER")")" != sampler ]]; then
    echo "[reproduce] SAMPLER=$SAMPLER: expected an existing preset file in a folder named sampler/ (e.g. DIR/sampler/tuned.yaml" \
         "from scripts/tune.py), or a conf/sampler preset name" >&2
    exit 2
  fi
  SAMPLER_ARGS=(--config-dir "$(cd "$(dirname "$SAMPLER")/.." && pwd)" "sampler=$(basename "$SAMPLER" .yaml)")
else
  SAMPLER_ARGS=("sampler=$SAMPLER")
fi
HF_REPO="https://huggingface.co/ShoufaChen/PixelFlow-Class2Image"
REF_URL="https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz"
INCEPTION_URL="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"

fetch() {  # fetch URL DEST
  mkdir -p "$(dirname "$2")"
  echo "[reproduce] downloading $1 -> $2"
  curl -fL --retry 3 -o "$2.part" "$1" && mv "$2.part" "$2"
}

override() {  # override KEY DEFAULT: the last KEY=value among the overrides, else DEFAULT
  local value="$2" o
  for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do [[ "$o" == "$1="* ]] && value="${o#*=}"; done
  echo "$value"
}
DEVICES="$(override devices 1)"; BATCH="$(override batch_size 16)"; PRECISION="$(override precision auto)"
print_plan() {
  "$PYTHON" "$ROOT/scripts/sampling_plan.py" --num-samples "$NUM_SAMPLES" --devices "$DEVICES" --batch "$BATCH" \
    --precision "$PRECISION" --out-dir "$OUT_DIR"
}
if (( DRY_RUN )); then
  print_plan
  echo "[reproduce] dry run: nothing sampled (inputs: $CKPT_DIR, $REF)"
  exit 0
fi

missing=()
[[ -f "$CKPT_DIR/model.pt" ]] || missing+=("checkpoint: $CKPT_DIR/model.pt")
[[ -f "$CKPT_DIR/config.yaml" ]] || missing+=("checkpoint config: $CKPT_DIR/config.yaml")
[[ -f "$REF" ]] || missing+=("ADM reference batch: $REF")
if (( ${#missing[@]} )); then
  if [[ "${DOWNLOAD:-0}" == 1 ]]; then
    for f in model.pt config.yaml; do
      [[ -f "$CKPT_DIR/$f" ]] || fetch "$HF_REPO/resolve/main/$f" "$CKPT_DIR/$f" \
        || { echo "[reproduce] download of $f from $HF_REPO failed (no network?)" >&2; exit 1; }
    done
    [[ -f "$REF" ]] || fetch "$REF_URL" "$REF" || { echo "[reproduce] download of the reference batch failed (no network?)" >&2; exit 1; }
    if [[ -z "$INCEPTION_WEIGHTS" ]]; then
      INCEPTION_WEIGHTS="$ROOT/data/weights-inception-2015-12-05-6726825d.pth"
      [[ -f "$INCEPTION_WEIGHTS" ]] || fetch "$INCEPTION_URL" "$INCEPTION_WEIGHTS" || INCEPTION_WEIGHTS=""
    fi
  else
    {
      echo "[reproduce] missing inputs (nothing is downloaded unless DOWNLOAD=1):"
      printf '  - %s\n' "${missing[@]}"
      echo "Download them on a machine with network access and put them there:"
      echo "  1. model.pt and config.yaml from the Hugging Face repo ShoufaChen/PixelFlow-Class2Image"
      echo "     ($HF_REPO) into $CKPT_DIR/"
      echo "  2. VIRTUAL_imagenet256_labeled.npz, the ImageNet 256x256 reference batch listed on the openai/guided-diffusion"
      echo "     evaluations page (evaluations/README.md; $REF_URL), to $REF"
      echo "  3. optional, for the Inception Score: torch-fidelity's $INCEPTION_URL; pass INCEPTION_WEIGHTS=/path/to/it"
      echo "Or pass other locations: $0 CKPT_DIR REF_NPZ, or rerun with DOWNLOAD=1 where there is network."
    } >&2
    exit 1
  fi
fi

print_plan
"$PYTHON" "$ROOT/sample.py" "${SAMPLER_ARGS[@]}" ckpt="$CKPT_DIR/model.pt" num_samples="$NUM_SAMPLES" \
  batch_size=16 precision=auto out_dir="$OUT_DIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
"$PYTHON" "$ROOT/evaluate.py" samples="$OUT_DIR/samples.npz" ref="$REF" device="$DEVICE" \
  inception_weights="${INCEPTION_WEIGHTS:-null}" protocol="$PROTOCOL" out="$OUT_DIR/metrics.json"
"$PYTHON" - "$OUT_DIR/metrics.json" <<'EOF'
import json, sys
result = json.load(open(sys.argv[1]))
paper = {"fid": 1.98, "sfid": 5.83, "inception_score": 282.1, "precision": 0.81, "recall": 0.60}
print(f"\n{'metric':18s} {'this run':>10s} {'paper':>8s}")
for key, ref in paper.items():
    ours = result["metrics"].get(key)
    print(f"{key:18s} {'n/a' if ours is None else format(ours, '.3f'):>10s} {ref:8.2f}")
print(f"({result['protocol']['num_samples']} samples, metric protocol {result['protocol']['metric_protocol']}; "
      f"unavailable: {result['unavailable'] or 'none'})")
EOF
