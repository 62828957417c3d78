#!/usr/bin/env bash
# GPU check of the trainer (bench/trainer/gpu_check.py): one bf16 DeepSpeed ZeRO-2 Step-APO step with
# FlashAttention-2 when installed (SDPA otherwise), one SFT step, one value-model step, on a small random Llama
# built locally. No internet, no vLLM. A few minutes on one H100; prints PASS/FAIL per check and a SUMMARY line,
# exits non-zero on failure.
#
#   bench/gpu_check.sh               # on the GPU machine
#   bench/gpu_check.sh --cpu-smoke   # the same steps on CPU (fp32, no DeepSpeed), to check the script
#   bench/gpu_check.sh --no-deepspeed  # GPU, plain PyTorch (bf16 autocast over fp32 weights)
#
# Needs: torch (CUDA build), transformers, tokenizers, safetensors, pydantic, tqdm, and the repository on disk;
# optional: deepspeed (ZeRO-2), flash-attn (FlashAttention-2). PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" bench/trainer/gpu_check.py "$@"
