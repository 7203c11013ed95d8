#!/usr/bin/env bash
# On the GPU machine after the payload parts are in /root/keep: unpack the
# 4.5-bpw model, the GGUF reference and GSM8K; import the GGUF as the float
# reference (tensors by optiq, tokenizer files carried with --tokenizer: the
# device's transformers lacks the GGUF tokenizer converter).
set -e
cd /root/keep
cat payload.* | tar -x && rm -f payload.*
ls -la /root/keep
python3 -m optiq import-gguf /root/keep/smol.gguf -o /root/.cache/optiq/gguf/smol-b179c9523d0e --tokenizer /root/keep/reftok --force
