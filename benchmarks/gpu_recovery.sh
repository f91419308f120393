# Device call: distillation recovery on SmolLM2, time-boxed to one call; run it again to continue.
#   first call (right after gpu_e2e.sh left /tmp/gguf/part1; carry .whl .gguf2 .data):
#       bash benchmarks/gpu_recovery.sh --budgets 0.8 --save /tmp/kd
#   next call (same warm machine):   bash benchmarks/gpu_recovery.sh --resume /tmp/kd-0.8 --lr 2e-4 --save /tmp/kd2
OUT=${OUT:-.out}; mkdir -p $OUT
GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $GGUF ]; then cat /tmp/gguf/part1 .gguf2/part > $GGUF; fi
md5sum $GGUF | grep -q a1231443440b107ff29f02bdb38c9d0a || { echo "GGUF parts missing or corrupt"; exit 3; }
export BLASTFX_GENSIM_DATA=$PWD/.data
source benchmarks/gpu_setup.sh
python3 benchmarks/recovery_smollm2.py --gguf $GGUF --minutes 30 --deadline ${DEADLINE:-9} --batch 32 --lr 3e-4 \
    --generate 6144 --generate-batch 1024 --data-cache /tmp/gguf/generated.pt "$@" 2>&1 \
    | grep -v "Warning\|Converting\|Loading weights" | tee -a $OUT/recovery.md
