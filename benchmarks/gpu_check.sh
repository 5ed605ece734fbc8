#!/usr/bin/env bash
# The GPU checks in one run on one H100-class GPU, about 8 minutes (each step has a timeout; all of
# them together 12):
#   bash benchmarks/gpu_check.sh [OUT_FOLDER]     (needs data/ml-1m; writes logs and JSON to OUT_FOLDER)
# 1. the CUDA-only tests; 2. bench.py on CUDA; 3. one sequence-mode epoch (sequence_epoch.py), eager
# and compiled, then with each time switch and with the feature switches; 4. configs/ml1m_best.yaml (sequence mode) for a few
# epochs: seconds per epoch and peak GPU memory; 5. the sequence mode on a generated ML-20M-size
# folder (configs/ml20m.yaml): training targets per second and peak GPU memory.
# Goals: the post's model <= 1 s per ML-1M epoch; ml1m_best to its best validation epoch in
# <= 3 minutes; a generated ML-20M-size epoch in sequence mode <= 30 s.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
step() { echo "== $1 ($(date +%T))"; }

step "GPU" && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
step "CUDA tests" && timeout 120 python -m pytest -q -n 0 -k cuda tests/ 2>&1 | tail -5 | tee "$out/tests.txt"
step "bench.py" && timeout 150 python benchmarks/bench.py --data-dir data/ml-1m --device cuda --repeats 3 \
    --json "$out/bench.json" 2>&1 | tail -15 | tee "$out/bench.txt"
step "sequence_epoch.py (eager, then compiled)" && for c in false true; do timeout 90 python benchmarks/sequence_epoch.py \
    --data-dir data/ml-1m --device cuda --set trainer_config.compile=$c --json "$out/sequence_compile_$c.json" 2>&1 \
    | tail -4 | tee -a "$out/sequence.txt"; done
step "sequence_epoch.py without the biases, with the position bias only, with query time, then the features" && for sw in \
    "model_config.position_bias=false model_config.time_bias=false" "model_config.time_bias=false" \
    "model_config.query_time=true" \
    "model_config.movie_features=[genres,year] model_config.user_features=[age,sex,occupation] model_config.rating_input=true"; do
    timeout 40 python benchmarks/sequence_epoch.py --data-dir data/ml-1m --device cuda \
    $(for kv in $sw; do echo --set "$kv"; done) 2>&1 | tail -2 | sed "s/^/$sw: /" | tee -a "$out/sequence_time.txt"; done
step "ml1m_best, 4 epochs" && timeout 150 python model_train.py --config configs/ml1m_best.yaml \
    --set trainer_config.num_epochs=4 --set trainer_config.data_dir=data/ml-1m --set trainer_config.run_name=gpu-ml1m \
    --set trainer_config.model_dir="$out/models" --set trainer_config.tensorboard_dir="$out/runs" 2>&1 \
    | grep -E "run |epoch " | tee "$out/ml1m_best.txt"
step "generated ML-20M size" && timeout 60 python benchmarks/scale.py --folder data/synthetic-ml-20m \
    --ratings 20000263 --users 138493 --movies 27278 --json "$out/scale_20m.json" 2>&1 | tail -4 | tee "$out/scale_20m.txt"
step "ml20m.yaml, 1 epoch" && timeout 150 python model_train.py --config configs/ml20m.yaml \
    --set trainer_config.num_epochs=1 --set trainer_config.data_dir=data/synthetic-ml-20m \
    --set trainer_config.run_name=gpu-ml20m --set trainer_config.model_dir="$out/models" \
    --set trainer_config.tensorboard_dir="$out/runs" 2>&1 | grep -E "run |epoch " | tee "$out/ml20m.txt"
rm -rf "$out/models"
step "done"
