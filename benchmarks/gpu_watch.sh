# Device call: wait up to SECONDS for a run started by gpu_detach.sh, then bring its log and its
# output files back in this call's $OUT and print the log's end.
#   bash benchmarks/gpu_watch.sh NAME SECONDS
name=$1; end=$((SECONDS + $2))
while [ ! -f /tmp/runs/$name.rc ] && [ $SECONDS -lt $end ]; do sleep 5; done
OUT=${OUT:-.out}; mkdir -p $OUT
cp /tmp/runs/$name.log $OUT/ 2>/dev/null
cp /tmp/runs/$name/* $OUT/ 2>/dev/null
tail -n 30 /tmp/runs/$name.log
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
if [ -f /tmp/runs/$name.rc ]; then echo "$name finished, exit status $(cat /tmp/runs/$name.rc)"
else echo "$name still running at $(date -u +%H:%M:%S)"; fi
