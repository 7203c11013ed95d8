#!/usr/bin/env bash
# benchmarks/gsm8k.py on the lent H200 (README.md here says how the parts travel).
#   gsm8k.sh warm          compile the kernels of every 4.5-bpw candidate format, one process each, on
#                          2-layer random models (warm_kernels.py) while the parts travel
#   gsm8k.sh real          join the parts, import the GGUF (tokenizer carried), run the rows side by side
#                          (REAL_ROWS="optiq dwq": the processes to start, each a --rows list)
#   gsm8k.sh plan          join and import as `real` does, then one process: the PLAN_ROWS rows (default
#                          float,uniform,optiq; optiq-speed: --no-slower-than 4@64) one after another on the warmed
#                          kernels (timings comparable), the optiq rows' models kept (config and metadata to
#                          plans-meta/), then benchmarks/gpu.py's plans section on their plans and its kernels
#                          section at SmolLM2's and Llama-3-8B's shapes, then
#                          the PLAN_AFTER_ROWS (default awq,dwq; empty: none) the same way (WARM_WORK=kl,generate,speed for `warm` first)
#   gsm8k.sh collect WAIT  wait until no row runs (or WAIT s); JSONs and logs to $OUT/results.tgz
set -euo pipefail
keep=/root/keep runs=/root/runs
mkdir -p $runs /root/ptx
export MLX_PTX_CACHE_DIR=/root/ptx HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=/root/site:/root/repo
# background rows run from a copy: the next call's working tree replaces this one
[ "$1" = collect ] || { mkdir -p /root/repo && tar -c --exclude=./.gpu . | tar -x -C /root/repo; }
[ -n "$(ls -A /root/ptx)" ] || tar -C /root -xzf benchmarks/gpu_jobs/ptx-mlx-0.32.4-h200.tgz
data="--wikitext $keep/data/wiki.test.raw --gsm8k $keep/data/test.jsonl"
formats="4:64:dwq,convert 4:128 5:64 5:128 6:64 6:128 8:64 8:128"
join_parts() {
  cat $(ls $keep/q/c* | sort) > $keep/qwen.gguf && rm -f $keep/q/c*
  ls -la $keep/qwen.gguf
  # the device's transformers lacks the GGUF tokenizer converter: the tokenizer made here travels
  python3 -m optiq import-gguf $keep/qwen.gguf -o /root/ref --tokenizer $keep/qwentok --force
  # a cache still being written could hand the rows a half-written kernel: take the finished ones only
  end=$(( $(date +%s) + 120 ))
  while pgrep -f warm_kernels.py >/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  for d in /root/warm/ptx-*; do if [ -e $d.done ]; then cp -rn $d/. /root/ptx/; fi; done
  echo "warm: $(ls /root/warm/*.done 2>/dev/null | wc -l) finished; tails:"; tail -n 2 /root/warm/*.log || true
}
case "$1" in
warm)
  mkdir -p /root/warm
  for f in $formats; do
    IFS=: read -r bits group also <<< "$f"; cache=/root/warm/ptx-$bits-$group
    mkdir -p $cache && cp -r /root/ptx/. $cache/
    # setsid: the call's end kills its process group. .done marks the process ended, failed or not: what it
    # compiled before a failure is whole (2026-12-03: every `speed` work died after generation, caches intact)
    MLX_PTX_CACHE_DIR=$cache OMP_NUM_THREADS=2 setsid nohup bash -c "cd /root/warm && python3 /root/repo/benchmarks/gpu_jobs/warm_kernels.py \
        --config $keep/qwentok --bits $bits --group-size $group --work '${WARM_WORK:-kl,generate}${also:+,$also}' $data > $bits-$group.log 2>&1; touch $cache.done" \
        < /dev/null > /dev/null 2>&1 &
  done
  sleep 2; pgrep -fc warm_kernels.py || true
  ;;
real)
  join_parts
  cd $runs
  for rows in ${REAL_ROWS:-float,uniform awq dwq optiq}; do
    setsid nohup python3 /root/repo/benchmarks/gsm8k.py --reference /root/ref $data --rows $rows --out-dir $runs/gsm8k \
      > $runs/gsm8k-${rows/,/-}.log 2>&1 < /dev/null &
  done
  ;;
plan)
  join_parts
  cd $runs
  kept=/root/Qwen2.5-Coder-1.5B-Instruct-optiq-4.5bpw  # the optiq row's model; the optiq-speed row's is $kept-speed
  setsid nohup bash -c "python3 /root/repo/benchmarks/gsm8k.py --reference /root/ref $data --rows ${PLAN_ROWS:-float,uniform,optiq} \
      --out-dir $runs/gsm8k --keep-optiq $kept > $runs/gsm8k-plan.log 2>&1; \
      for d in $kept $kept-speed; do [ -d \$d ] && mkdir -p $runs/plans-meta/\${d##*/} && cp \$d/config.json \$d/optiq_metadata.json $runs/plans-meta/\${d##*/}/; done; \
      python3 /root/repo/benchmarks/gpu.py --sections plans --plan \$(ls -d $kept $kept-speed 2>/dev/null) --plan-shapes ${PLAN_SHAPES:-own,llama-3-8b} --out $runs/plans > $runs/plans.log 2>&1; \
      python3 /root/repo/benchmarks/gpu.py --sections kernels --plan /root/repo/benchmarks/results/plans/SmolLM2-135M-Instruct-optiq-4.5bpw-wikitext.json \
        --out $runs/kernels > $runs/kernels.log 2>&1; \
      [ -z '${PLAN_AFTER_ROWS-awq,dwq}' ] || python3 /root/repo/benchmarks/gsm8k.py --reference /root/ref $data --rows ${PLAN_AFTER_ROWS-awq,dwq} --out-dir $runs/gsm8k > $runs/gsm8k-after.log 2>&1" \
      < /dev/null > /dev/null 2>&1 &
  ;;
collect)
  end=$(( $(date +%s) + ${2:-0} ))
  while pgrep -f "benchmarks/(gsm8k|gpu)\.py" >/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  echo "running: $(pgrep -fc "benchmarks/(gsm8k|gpu)\.py" || true)"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
  cp /root/warm/*.log $runs/ 2>/dev/null || true
  cd $runs; for f in *.log; do echo "== $f"; tail -5 $f; done
  tar -czf $OUT/results.tgz $(ls -d gsm8k plans plans-meta kernels *.log 2>/dev/null); tar -tzf $OUT/results.tgz
  du -sh /root/ptx
  ;;
esac
