#!/usr/bin/env bash
# tune_long.sh CHECKPOINTS NAME:OPTIONS [NAME:OPTIONS ...]: one detached
# benchmarks/tune_sweep.py per NAME over /root/keep/model, each with its own
# tune_sweep options (spaces as commas are not allowed: use '+' between them),
# all sharing one kernel cache; logs and JSONs under /root/runs. collect.sh waits.
#   bash benchmarks/gpu_jobs/tune_long.sh 512,1024,2048 wiki:--lrs+3e-6 sampled:--lrs+3e-6+--self-sampled+2048
# --dtype model: with fp32 activations MLX-CUDA 0.32.4 failed in
# cuGraphAddKernelNode on the quantized forward.
set -e
export PYTHONPATH=/root/site:$PWD MLX_PTX_CACHE_DIR=/root/ptx
checkpoints=$1; shift
export OMP_NUM_THREADS=$(( $(nproc) / $# > 0 ? $(nproc) / $# : 1 ))
mkdir -p /root/runs
[ -d /root/ptx ] || tar -C /root -xzf benchmarks/gpu_jobs/ptx-mlx-0.32.4-h200.tgz
rm -rf /root/runs/benchmarks /root/runs/optiq; cp -r benchmarks optiq /root/runs/
cd /root/runs
for spec in "$@"; do
  name=${spec%%:*}; opts=${spec#*:}
  setsid nohup python3 benchmarks/tune_sweep.py --dtype model --model /root/keep/model \
    --reference /root/.cache/optiq/gguf/smol-b179c9523d0e --wikitext /root/keep/wikitext/wiki.test.raw \
    --temperatures 1 --checkpoints $checkpoints ${opts//+/ } --out /root/runs/tune-sweep-$name.json \
    > /root/runs/tune-$name.log 2>&1 < /dev/null &
done
sleep 2; pgrep -fc benchmarks/tune_sweep.py
