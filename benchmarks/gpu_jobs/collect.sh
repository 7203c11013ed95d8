#!/usr/bin/env bash
# collect.sh WAIT_S: wait until no lora.py or tune_sweep.py runs or WAIT_S passes; log tails; JSONs and logs to $OUT/results.tgz.
end=$(( $(date +%s) + $1 ))
while pgrep -f "benchmarks/(lora|tune_sweep).py" >/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
echo "running: $(pgrep -fc "benchmarks/(lora|tune_sweep).py")"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
cd /root/runs; for f in *.log; do echo "== $f"; tail -4 $f; done
# One archive: the device returns only about 8 files a call, and no names with "+".
# Tuned values stay files of their own (at most 16 MiB a file comes back):
# those over 15 MiB (trained codes) in 15 MiB parts, joined here with
# `cat NAME.part* > NAME`. TUNED=GLOB returns only the tuned files it names.
mkdir -p r; for f in lora-*.json tune-sweep* tune-gpu*.json; do [ -e "$f" ] && cp -f "$f" "r/${f//+/-plus-}"; done
for f in r/${TUNED:-*}-tuned.safetensors; do
  [ -e "$f" ] || continue
  if [ "$(stat -c %s "$f")" -gt $((15 << 20)) ]; then split -b 15M -d "$f" "$OUT/$(basename "$f").part"; else cp "$f" $OUT/; fi
done
tar -czf $OUT/results.tgz --exclude='*.safetensors' r *.log; tar -tzf $OUT/results.tgz; ls -la $OUT
du -sh /root/ptx
# PTX=1: the grown kernel cache too (replace the committed one with it)
[ "${PTX:-0}" = 1 ] && tar -C /root -czf $OUT/ptx-mlx-0.32.4-h200.tgz ptx || true
