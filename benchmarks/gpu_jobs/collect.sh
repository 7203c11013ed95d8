#!/usr/bin/env bash
# collect.sh WAIT_S: wait until no lora.py or tune_sweep.py runs or WAIT_S passes; copy JSONs and log tails to $OUT.
end=$(( $(date +%s) + $1 ))
while pgrep -f "benchmarks/(lora|tune_sweep).py" >/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
echo "running: $(pgrep -fc "benchmarks/(lora|tune_sweep).py")"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
cd /root/runs; for f in *.log; do echo "== $f"; tail -4 $f; done
mkdir -p $OUT/r; for f in lora-*.json tune-sweep*; do [ -e "$f" ] && cp -f "$f" "$OUT/r/${f//+/-plus-}"; done  # the device returns no names with "+"
 tar -czf $OUT/logs.tgz *.log; ls $OUT/r
du -sh /root/ptx
tar -C /root -czf $OUT/ptx-mlx-0.32.4-h200.tgz ptx   # the grown kernel cache: replace the committed one with it
