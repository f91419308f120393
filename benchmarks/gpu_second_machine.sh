# First call on a session's second machine (carry .whl and .gguf1), about 3 minutes: the backward-
# middle microbenchmark, the training-step profile and the b = 16 layer rows. It leaves the first half
# of the SmolLM2 file in /tmp/gguf for the next call, gpu_recovery.sh (carry .whl .gguf2 .data .gen).
OUT=${OUT:-.out}; mkdir -p $OUT /tmp/gguf
cp .gguf1/part /tmp/gguf/part1
source benchmarks/gpu_setup.sh
timeout 90 python3 benchmarks/grad_mix_speed.py 2>&1 | tee $OUT/grad_mix.md
timeout -s ABRT 120 python3 -X faulthandler benchmarks/train_step_profile.py --steps 5 2>&1 \
    | grep --line-buffered -v "Warning\|warn" | tee $OUT/profile.md
timeout 100 python3 benchmarks/layer_speed.py --blocks 16 2>&1 | tee $OUT/layer16.md
