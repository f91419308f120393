# Source on the GPU box (device tool) before a SmolLM2 run: joins the GGUF's two parts (the first left in
# /tmp/gguf by an earlier call carrying .gguf1, the second carried now in .gguf2: a call carries 64 MiB),
# checks it, stages the teacher-generated rows from .gen, points the gensim text at .data and installs
# the wheels (gpu_setup.sh). Sets GGUF.
mkdir -p /tmp/gguf
GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $GGUF ]; then cat /tmp/gguf/part1 .gguf2/part > $GGUF; fi
md5sum $GGUF | grep -q a1231443440b107ff29f02bdb38c9d0a || { echo "GGUF parts missing or corrupt"; rm -f $GGUF; exit 3; }
if [ -f .gen/generated.pt ] && [ ! -f /tmp/gguf/generated.pt ]; then cp .gen/generated.pt /tmp/gguf/; fi
export BLASTFX_GENSIM_DATA=$PWD/.data
source benchmarks/gpu_setup.sh
