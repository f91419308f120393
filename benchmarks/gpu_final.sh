# Device call: decode-kernel CUDA tests, decode-size layer rows, end-to-end Llama-7B shape, prefill rows.
OUT=${OUT:-.out}; mkdir -p $OUT
source benchmarks/gpu_setup.sh
timeout 60 python3 -m pytest -q -x tests/test_kernels.py -k "one_launch or every_path_half or dispatches" 2>&1 | tail -4 | tee $OUT/tests.log
timeout 75 python3 benchmarks/layer_speed.py --tokens 1 16 --paths 2>&1 | tee $OUT/layer_decode.md
timeout 235 python3 benchmarks/llama_e2e.py --new-tokens 128 2>&1 | grep -v "^W1\|Warning" | tail -30 | tee $OUT/e2e.md
timeout 70 python3 benchmarks/layer_speed.py --tokens 128 1024 4096 2>&1 | tee $OUT/layer_prefill.md
