#!/usr/bin/env bash
# The GPU checks of the training step, prepared for a short lease on one H100/H200:
#   bench  bench/train_throughput.py at Llama-135M, bf16, B16 x T2048: llmfn compiled, HF
#          compiled, llmfn compiled with the whole logits (no chunked loss), llmfn's model the
#          nn.Module way (as_module + backward + fused AdamW), HF eager, llmfn eager, llmfn
#          compiled without donating the state, one after another
#          (each its own peak memory; the time limit may cut the last rows): tok/s, MFU, peak
#          GiB, ratios, each row printed and saved as measured (a timeout keeps them). About
#          6-9 minutes, most of it compiling (llmfn's cold compile was 253 s on 2 CPU cores).
#   train  the CLI trains configs/llama-135m-gpu.yaml (compiled, bf16) for 20 steps with two
#          evals and a sample, into a run folder, profiling steps 13-15 (the top CUDA ops are
#          printed; the trace is in runs/*/profile/). About 2-3 minutes.
# Each part has its own time limit, so a slow one still leaves the other's results, in $OUT
# (default bench/results/gpu): bench.log, train_throughput_gpu.json, train.log, runs/.
#
#   bash bench/gpu_check.sh            # both parts (over 10 minutes: more than one device call)
#   bash bench/gpu_check.sh bench      # one part
set -uo pipefail
out=${OUT:-bench/results/gpu}
parts=${*:-bench train}
mkdir -p "$out"
python3 -c 'import torch, tensordict; print("torch", torch.__version__, "tensordict",
  tensordict.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")'

for part in $parts; do
  case $part in
    bench)
      timeout 560 python3 bench/train_throughput.py --preset llama-135m --batch 16 --seq 2048 \
        --out "$out/train_throughput_gpu.json" >"$out/bench.log" 2>&1
      echo "bench: exit $? (log $out/bench.log)"; tail -n 16 "$out/bench.log" ;;
    train)
      timeout 300 python3 -m llmfn.train configs/llama-135m-gpu.yaml \
        train.max_steps=20 train.eval_every=10 data.val_batches=2 checkpoint.every=0 checkpoint.save_best=false \
        logging.log_every=5 train.sample_tokens=16 train.run_dir="$out/runs" \
        logging.profile_at=12 logging.profile_steps=3 \
        train.run_name="gpu-$(date +%Y%m%d-%H%M%S)" >"$out/train.log" 2>&1
      echo "train: exit $? (log $out/train.log)"; tail -n 12 "$out/train.log"
      head -n 25 "$out"/runs/gpu-*/profile/top_ops_*.txt 2>/dev/null ;;
    *) echo "unknown part '$part': expected bench or train" >&2; exit 2 ;;
  esac
done
