# Device call: the end-to-end Llama-2-7B-shaped run alone (compiling 32 layers twice takes minutes).
OUT=${OUT:-.out}; mkdir -p $OUT
source benchmarks/gpu_setup.sh
timeout 570 python3 benchmarks/llama_e2e.py --new-tokens 128 2>&1 | grep -v "^W1\|Warning" | tail -40 | tee $OUT/e2e.md
