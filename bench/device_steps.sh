#!/bin/bash
# Helpers for the device scripts (sourced): time-boxed steps logged to $OUT, and FlashAttention-4 from carried wheels.
#   step SECONDS NAME COMMAND...   runs COMMAND with a time limit, its output appended to $LOG
#   install_fa4 DIR                installs the wheels in DIR (flash-attn-4 4.0.0b36 and its CuTe DSL dependencies,
#                                  see docs/BENCHMARKS.md) into /root/fa4site and puts them on PYTHONPATH; a
#                                  cu13 wheel split in `*.part-*` pieces (one call carries at most 64 MiB) is joined first
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
LOG=${LOG:-$OUT/suite.log}
export PYTHONUNBUFFERED=1

step() {
    local limit=$1 name=$2
    shift 2
    echo "=== $(date +%T) $name" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?   # before any command substitution below resets $?
    echo "=== $(date +%T) $name: exit $rc" | tee -a "$LOG"
}

install_fa4() {
    local wheels=$1
    if ls "$wheels"/*.part-* >/dev/null 2>&1; then
        cat "$wheels"/*.part-* >"$wheels/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl"
        rm -f "$wheels"/*.part-*
    fi
    if ls "$wheels"/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/fa4site \
            "$wheels"/*.whl >>"$LOG" 2>&1
    fi
    # --target skips the package's .pth: its DSL packages go on the path by hand
    export PYTHONPATH=/root/fa4site:/root/fa4site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
    python3 -c "import flash_attn.cute; print('flash_attn.cute imported')" 2>&1 | tail -1 | tee -a "$LOG"
}
