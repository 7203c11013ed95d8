#!/usr/bin/env bash
# launch.sh ROWS SEEDS: one detached benchmarks/lora.py process per row (its
# seeds in turn, so a residual row takes its SVDs once), all sharing one kernel
# cache seeded from the committed one; logs and JSONs under /root/runs.
# Detached processes outlive the device call; collect.sh waits on them.
# 15 processes (one per row and seed) choked the host's 16 cores: kernel
# compilation and the residual SVDs are host work, so keep it to a few, each
# with its share of the cores (BLAS would otherwise start 16 threads in each).
# EXTRA: more lora.py options for every process (e.g. --save-adapters DIR).
set -e
export PYTHONPATH=/root/site:$PWD MLX_PTX_CACHE_DIR=/root/ptx
rows=(${1//,/ })
export OMP_NUM_THREADS=$(( $(nproc) / ${#rows[@]} > 0 ? $(nproc) / ${#rows[@]} : 1 ))
mkdir -p /root/runs
[ -d /root/ptx ] || tar -C /root -xzf benchmarks/gpu_jobs/ptx-mlx-0.32.4-h200.tgz
rm -rf /root/runs/benchmarks /root/runs/optiq; cp -r benchmarks optiq /root/runs/
cd /root/runs
for row in ${rows[@]}; do
  setsid nohup python3 benchmarks/lora.py --model /root/keep/model \
    --reference /root/.cache/optiq/gguf/smol-b179c9523d0e --gsm8k /root/keep/gsm8k \
    --rows $row --seeds $2 --steps-per-eval 50 --n-test 128 --test-batch 64 \
    --speed-iters 0 $EXTRA --out /root/runs/lora-$row.json > /root/runs/$row.log 2>&1 < /dev/null &
done
sleep 2; pgrep -fc benchmarks/lora.py
