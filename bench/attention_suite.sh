#!/bin/bash
# Issue 16's measurements in two device calls, each step time-boxed; everything goes to $OUT/suite.log. The
# FlashAttention-4 wheels (flash-attn-4 4.0.0b36 and its CuTe DSL dependencies, docs/BENCHMARKS.md) exceed what one
# call carries (64 MiB), so the CUDA 13 wheel travels split in two `split -b 46M` parts:
#   call 1, carrying .whl (the small wheels + part 1) and .whl_h5 (the gguf wheel, for the GGUF tests):
#       bash bench/attention_suite.sh tests
#   call 2, at once (a warm machine keeps /root/fa4 about 30 s), carrying .whl2 (part 2) and .comfy_src (ComfyUI's
#   source and the pure-Python parts of its dependencies, for bench/native_forward.py):
#       bash bench/attention_suite.sh forward
set -u
PHASE=${1:?usage: bash bench/attention_suite.sh tests|forward}
OUT=${OUT:-/tmp/attention_suite}
source "$(dirname "$0")/device_steps.sh"
FA4_WHEELS=/root/fa4
mkdir -p "$FA4_WHEELS"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

if [ "$PHASE" = tests ]; then
    cp .whl/* "$FA4_WHEELS"/
    python3 -m pip install -q --no-index --no-deps --target /root/gguf .whl_h5/*.whl >>"$LOG" 2>&1
    export PYTHONPATH=/root/gguf${PYTHONPATH:+:$PYTHONPATH}
    step 330 "GPU tests" python3 -m pytest tests -m gpu -q -p no:cacheprovider -rs --durations=6
    step 150 "memcheck: int8_triton" compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 -m pytest tests/test_sage_int8_gpu.py -q -p no:cacheprovider -k small
    step 80 "memcheck: fused block stages" compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 -m pytest tests/test_fused_block_stages.py tests/test_fused_ops.py -q -p no:cacheprovider -m gpu
    step 40 "block stages" python3 bench/block_stages.py
else
    cp .whl2/* "$FA4_WHEELS"/
    install_fa4 "$FA4_WHEELS"
    step 60 "GPU tests: FA4, auto" python3 -m pytest tests/test_attention_gpu.py -q -p no:cacheprovider -rs \
        -k "tuned or flash_attn_4 or fa4 or auto"
    step 110 "fp8 forward against ComfyUI native" python3 bench/native_forward.py --comfyui-dir .comfy_src \
        --precision fp8 --attention auto,int8_triton --top-kernels 10
    step 75 "bf16 forward against ComfyUI native" python3 bench/native_forward.py --comfyui-dir .comfy_src \
        --precision bf16 --top-kernels 10
    step 100 "attention at the Wan shapes" python3 bench/attention.py --repeats 5
fi
echo "=== $(date +%T) done" | tee -a "$LOG"
grep -E "^===|passed|failed|ERROR SUMMARY|^\| (ComfyUI|wantalk)|^profile" "$LOG" | tail -40
