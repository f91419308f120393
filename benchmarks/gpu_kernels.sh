# One device call: CUDA tests, layer speed (with per-path profile), end-to-end Llama-7B shape.
#   bash benchmarks/gpu_kernels.sh   (outputs under $OUT, or ./.out)
OUT=${OUT:-.out}; mkdir -p $OUT
source benchmarks/gpu_setup.sh
timeout 130 python3 -m pytest -q -x tests/test_kernels.py "tests/test_compiler.py::test_cuda_reduce_overhead_matches_eager" 2>&1 | tail -15 | tee $OUT/tests.log
timeout 150 python3 benchmarks/layer_speed.py --paths 2>&1 | tee $OUT/layer.md
timeout 290 python3 benchmarks/llama_e2e.py 2>&1 | grep -v Warning | tee $OUT/e2e.md
