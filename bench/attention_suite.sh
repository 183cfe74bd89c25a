#!/bin/bash
# Issue 16's measurements in one device call, most important first, each step time-boxed; everything goes to
# $OUT/suite.log (the JSON lines of the bench scripts to $OUT/*.json). Run from the repository root:
#     bash bench/attention_suite.sh
# FlashAttention-4 comes from wheels unpacked under $FA4_WHEELS (flash-attn-4 4.0.0b36 and its CuTe DSL
# dependencies, see docs/BENCHMARKS.md); without them every step still runs, on cuDNN.
set -u
OUT=${OUT:-/tmp/attention_suite}
source "$(dirname "$0")/device_steps.sh"
install_fa4 "${FA4_WHEELS:-/root/fa4}"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"
LISTING=keys_infinitetalk.txt
FP8=fp8_e4m3fn_scaled_fast

step 90 "GPU tests: FA4, auto, cuDNN/flash through their ATen ops" \
    python3 -m pytest tests/test_attention_gpu.py -q -p no:cacheprovider -rs \
    -k "auto or flash_attn_4 or fa4 or sdpa_cudnn or sdpa_flash or pinned"
step 100 "bench/attention.py (Wan shapes, every mode)" python3 bench/attention.py --repeats 5
step 140 "forward fp8: auto (FA4) vs sdpa (cuDNN) vs int8_triton, profiles, host cost" \
    python3 bench/forward.py --listing $LISTING --quantization $FP8 --attention auto \
    --compare-attention sdpa,int8_triton --profile --host-cost
step 100 "forward bf16: auto (FA4) vs sdpa (cuDNN), profiles" \
    python3 bench/forward.py --listing $LISTING --attention auto --compare-attention sdpa --profile
step 40 "FA4 vs cuDNN crossover" python3 bench/attention.py --shapes crossover --repeats 3 \
    --modes auto,sdpa_cudnn,flash_attn_4
step 60 "int8_triton pipelined configs, FP8 P.V" python3 bench/sage_int8.py --configs pipelined --pv fp8
step 60 "GPU tests: int8_triton" python3 -m pytest tests/test_sage_int8_gpu.py -q -p no:cacheprovider -x
echo "=== $(date +%T) done" | tee -a "$LOG"
grep -E "^(===|\| (self|text|clip|audio|odd|cross)|profile|[0-9]+ (passed|failed))|passed|failed|TFLOP|int8_triton fp8" "$LOG" | tail -80
