# Device call: start a run that outlives the call, for work longer than one call's 10 minutes on one
# warm machine (a process in its own session survives the call; the machine stays held while later
# calls watch it with gpu_watch.sh, up to its 30 held minutes plus the call in flight).
#   bash benchmarks/gpu_detach.sh NAME 'command'      # log: /tmp/runs/NAME.log, exit status: NAME.rc
# The command runs with OUT=/tmp/runs/NAME (a call's own $OUT is emptied by the next call).
name=$1; shift
mkdir -p /tmp/runs/$name
rm -f /tmp/runs/$name.rc
OUT=/tmp/runs/$name setsid nohup bash -c "$*; echo \$? > /tmp/runs/$name.rc" \
    > /tmp/runs/$name.log 2>&1 < /dev/null &
echo "started $name (pid $!) at $(date -u +%H:%M:%S)"
