# First device call of a session (carry .whl and .gguf1): the CUDA tests, the SmolLM2-shaped training
# step profile (eager Triton backward, per-block compile), then the end-to-end run (gpu_e2e.sh, which
# also leaves the first half of the GGUF for gpu_recovery.sh). About 8 minutes.
OUT=${OUT:-.out}; mkdir -p $OUT
source benchmarks/gpu_setup.sh
timeout 60 python3 -m pytest -q -x tests/test_backward_kernel.py tests/test_kernels.py -k "cuda or grad_mix" 2>&1 \
    | tail -5 | tee $OUT/gpu_tests.md
timeout -s ABRT 140 python3 -X faulthandler benchmarks/train_step_profile.py --steps 8 2>&1 \
    | grep --line-buffered -v "Warning\|warn" | tee $OUT/profile.md
E2E_LIMIT=${E2E_LIMIT:-370} bash benchmarks/gpu_e2e.sh
