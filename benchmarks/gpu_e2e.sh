# Device call: the end-to-end Llama-2-7B-shaped run alone (two 32-layer models, compiled twice each).
# With .gguf1 carried, it also leaves the first half of the SmolLM2 file in /tmp/gguf for the next
# call (gpu_recovery.sh), since 64 MiB is all one call can carry.
OUT=${OUT:-.out}; mkdir -p $OUT
if [ -f .gguf1/part ]; then mkdir -p /tmp/gguf && cp .gguf1/part /tmp/gguf/part1; fi
source benchmarks/gpu_setup.sh
timeout ${E2E_LIMIT:-560} python3 benchmarks/llama_e2e.py 2>&1 | grep --line-buffered -v "^W1\|Warning" | tee $OUT/e2e.md
