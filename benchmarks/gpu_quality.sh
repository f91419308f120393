# Device call: the no-retraining quality rows (benchmarks/quality_smollm2.py) on the GPU, where the
# factorizations and the sequential calibration are fast. Needs the GGUF's first part in /tmp/gguf
# (an earlier call carrying .gguf1); carry .whl .gguf2 .data. Arguments go to quality_smollm2.py, e.g.
#   bash benchmarks/gpu_quality.sh --budgets 0.8 --methods blastfx-loss-alloc-seq --iters 100 --calib-tokens 65536
OUT=${OUT:-.out}; mkdir -p $OUT
source benchmarks/gpu_gguf.sh
timeout -s ABRT ${LIMIT:-570} python3 -X faulthandler benchmarks/quality_smollm2.py --gguf $GGUF "$@" 2>&1 \
    | grep --line-buffered -v "Warning\|Converting\|Loading weights" | tee -a $OUT/quality.md
