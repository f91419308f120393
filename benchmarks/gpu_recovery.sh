# Device call: distillation recovery on SmolLM2 (decoder blocks compiled), time-boxed to one call; run
# it again with --resume to continue. The GGUF is 94 MB and a call carries 64 MiB, so it travels in two
# parts: gpu_e2e.sh (carrying .gguf1) leaves the first in /tmp/gguf.
#   first call (carry .whl .gguf2 .data, and .gen if a previous session brought generated.pt back):
#       bash benchmarks/gpu_recovery.sh --budgets 0.8 --save /tmp/kd
#   next calls (same warm machine; carry .whl .data): one schedule of --minutes 30 across the calls
#       bash benchmarks/gpu_recovery.sh --resume /tmp/kd-0.8 --save /tmp/kd-0.8
# A run longer than one call (one schedule, no resume): detach it on a warm machine and watch it, e.g.
#       bash benchmarks/gpu_detach.sh kd8 'LIMIT=2400 DEADLINE=36 bash benchmarks/gpu_recovery.sh --budgets 0.8 \
#           --minutes 30 --iters 100 --eval-every 5'  &&  bash benchmarks/gpu_watch.sh kd8 560
#   then `bash benchmarks/gpu_watch.sh kd8 560` again at once after each reply (carry .whl .data): the
#   machine goes back 30 s after a call ends, and after 30 minutes held (at the end of the call in flight).
#   From the loss-aware start (strategy loss keeps some layers dense and gives each its own ranks:
#   compile_blocks compiles a shape-generic graph: 2-3 minutes to the first step on an H100), e.g.
#       bash benchmarks/gpu_detach.sh kd5 'LIMIT=1700 DEADLINE=27 bash benchmarks/gpu_recovery.sh --budgets 0.5 \
#           --minutes 24 --iters 100 --calib-tokens 65536 --objective loss --strategy loss --eval-every 5'  &&  bash benchmarks/gpu_watch.sh kd5 540
#   (eighth session, 6144 generated rows: 1.52x at 0.5, 1.09x at 0.8, both flat after 10 minutes: 25
#   passes over the text. Ninth session, the 0.5 command above plus --generate 20480 with .gen holding
#   those rows: 1.43x, still improving at the end.)
#   Kill a run with pkill -f 'python3 -X faulthandler benchmarks/recovery_[s]' (a plain pattern matches
#   the calling shell's own command line and kills the call).
# The teacher-generated rows (5 minutes of the first call) come back in $OUT/generated.pt.part*; join them
# into .gen/generated.pt (ignored) and carry .gen next time. A larger --generate extends the cached rows (uint16 tokens:
# ~26k rows fit beside .gguf2 in one call's 64 MiB), e.g. on its own machine before a KD run:
#       bash benchmarks/gpu_recovery.sh --generate 20480 --generate-only     # ~11 min for 14336 new rows
OUT=${OUT:-.out}; mkdir -p $OUT
source benchmarks/gpu_gguf.sh
# SIGABRT at the limit makes faulthandler print where it was; grep must not hold lines back.
timeout -s ABRT ${LIMIT:-570} python3 -X faulthandler benchmarks/recovery_smollm2.py --gguf $GGUF --minutes 30 \
    --deadline ${DEADLINE:-9} --batch 32 --lr 3e-4 --compile --generate 6144 --generate-batch 1024 \
    --data-cache /tmp/gguf/generated.pt "$@" 2>&1 \
    | grep --line-buffered -v "Warning\|Converting\|Loading weights" | tee -a $OUT/recovery.md
# A file comes back only up to 16 MiB: new rows return in 15 MiB parts (here: cat generated.pt.part* > .gen/generated.pt).
if [ -f /tmp/gguf/generated.pt ] && ! cmp -s /tmp/gguf/generated.pt .gen/generated.pt; then
    split -b 15M -d /tmp/gguf/generated.pt $OUT/generated.pt.part; fi
