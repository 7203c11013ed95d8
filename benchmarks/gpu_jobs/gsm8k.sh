#!/usr/bin/env bash
# benchmarks/gsm8k.py on the lent H200 (README.md here says how the parts travel).
#   gsm8k.sh warm          a random-weight model of the real shapes through every row, in the
#                          background: compiles MLX-CUDA's kernels while the GGUF's parts travel
#   gsm8k.sh real          join the parts, import the GGUF (tokenizer carried), run the rows side by side
#                          (REAL_ROWS="optiq dwq": the processes to start, each a --rows list)
#   gsm8k.sh collect WAIT  wait until no row runs (or WAIT s); JSONs and logs to $OUT/results.tgz
set -euo pipefail
keep=/root/keep runs=/root/runs
mkdir -p $runs /root/ptx
export MLX_PTX_CACHE_DIR=/root/ptx HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=/root/site:/root/repo
# background rows run from a copy: the next call's working tree replaces this one
[ "$1" = collect ] || { mkdir -p /root/repo && tar -c --exclude=./.gpu . | tar -x -C /root/repo; }
[ -n "$(ls -A /root/ptx)" ] || tar -C /root -xzf benchmarks/gpu_jobs/ptx-mlx-0.32.4-h200.tgz
data="--wikitext $keep/data/wiki.test.raw --gsm8k $keep/data/test.jsonl"
case "$1" in
warm)
  python3 - <<'PY'
import json, shutil
from pathlib import Path
import mlx.core as mx
from mlx_lm.models import qwen2
from mlx_lm.utils import save_model
tok, out = Path("/root/keep/qwentok"), Path("/root/rand")
config = json.loads((tok / "config.json").read_text())
model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
model.set_dtype(mx.bfloat16)
mx.eval(model.parameters())
save_model(out, model)
for f in tok.iterdir():
    shutil.copy(f, out / f.name)
print("random model", sorted(p.name for p in out.iterdir()))
PY
  cd $runs && setsid nohup python3 /root/repo/benchmarks/gsm8k.py --reference /root/rand $data --max-tokens 24 --dwq-steps 4 \
    --out-dir $runs/warm > $runs/warm.log 2>&1 < /dev/null &
  ;;
real)
  cat $(ls $keep/q/c* | sort) > $keep/qwen.gguf && rm -f $keep/q/c*
  ls -la $keep/qwen.gguf
  python3 - <<'PY'
import shutil
from pathlib import Path
from transformers import PreTrainedTokenizerFast
import optiq.gguf_import as g
tok = Path("/root/keep/qwentok")
# the device's transformers lacks the GGUF tokenizer converter: use the one made here
g.build_tokenizer = lambda meta, arch: (PreTrainedTokenizerFast.from_pretrained(str(tok)), False)
out = g.import_gguf("/root/keep/qwen.gguf", Path("/root/ref"))
for f in tok.iterdir():
    if f.name != "config.json":
        shutil.copy(f, out / f.name)
print("reference", sorted(p.name for p in out.iterdir()))
PY
  pkill -f "reference /root/rand" || true
  cd $runs
  for rows in ${REAL_ROWS:-float,uniform awq dwq optiq}; do
    setsid nohup python3 /root/repo/benchmarks/gsm8k.py --reference /root/ref $data --rows $rows --out-dir $runs/gsm8k \
      > $runs/gsm8k-${rows/,/-}.log 2>&1 < /dev/null &
  done
  ;;
collect)
  end=$(( $(date +%s) + ${2:-0} ))
  while pgrep -f "benchmarks/gsm8k.py" >/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  echo "running: $(pgrep -fc "benchmarks/gsm8k.py" || true)"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
  cd $runs; for f in *.log; do echo "== $f"; tail -5 $f; done
  tar -czf $OUT/results.tgz $(ls -d gsm8k warm *.log 2>/dev/null); tar -tzf $OUT/results.tgz
  du -sh /root/ptx
  ;;
esac
