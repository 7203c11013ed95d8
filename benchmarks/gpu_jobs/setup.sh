#!/usr/bin/env bash
# On the GPU machine after the payload parts are in /root/keep: unpack the
# 4.5-bpw model, the GGUF reference and GSM8K; import the GGUF as the float
# reference (tensors by optiq, tokenizer files carried: the device's
# transformers lacks the GGUF tokenizer converter).
set -e
cd /root/keep
cat payload.* | tar -x && rm -f payload.*
ls -la /root/keep
python3 - <<'PY'
import shutil
from pathlib import Path
from transformers import PreTrainedTokenizerFast
import optiq.gguf_import as g
tok = Path("/root/keep/reftok")
g.build_tokenizer = lambda meta, arch: (PreTrainedTokenizerFast.from_pretrained(str(tok)), True)
out = Path("/root/.cache/optiq/gguf/smol-b179c9523d0e")
g.import_gguf("/root/keep/smol.gguf", out)
for f in tok.iterdir():
    shutil.copy(f, out / f.name)
print("reference", sorted(p.name for p in out.iterdir()))
PY
