"""KV sensitivity: KL(reference || model with only one layer's cache quantized),
over a prefill and a stretch of teacher-forced decoding.

Teacher-forced decoding through a cache that quantizes from the first token
gives the same logits as one prefill through it: each token's keys and values
are quantized on their own, and every position attends to the quantized
entries of the positions before it either way (tested). So by default a probe
is one prefill, and it starts at the probed layer: the reference pass records
every block's input and the probe replays it (optiq.sensitivity's stand-ins),
running only the blocks from the probed layer on. `prefill=N` instead runs the
whole model over N tokens and decodes the rest one token at a time, for real.
Models whose later layers read earlier layers' caches (shared KV) always run
whole.

Only layers that own a KV cache are measured, keyed by their true layer
index: hybrid models (qwen3_5) skip their linear-attention layers, and
KV-shared layers (Gemma-3n, Gemma-4) follow their owner, whose probe covers
them. Sliding-window layers are measured with a quantized rotating cache.
Candidates are affine (optiq.kv.caches, keys and values at the same or at
their own bits) or TurboQuant (mode "turbo", full-attention layers only), so
the planner chooses the family and the K/V split per layer. Probes use the
same caches generation does (make_kv_cache).
"""

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from .. import metrics
from ..calibration import digest
from ..model_tree import block_list, norm_owner
from ..probe_hooks import run_it
from ..records import Candidate, KVEntry, LayerSensitivity, SensitivityTable
from ..standins import blocks_replaced, positions_only, recording, replaying_from
from .caches import make_kv_cache, shared_kv_owners

UNQUANTIZED = Candidate(16, 64)


def cache_layers(model) -> list:
    """[(layer index, 'full' | 'sliding')] for every layer that has a KV cache."""
    out = []
    for i, cache in enumerate(make_prompt_cache(model)):
        if isinstance(cache, RotatingKVCache):
            out.append((i, "sliding"))
        elif isinstance(cache, KVCache):
            out.append((i, "full"))
    return out


def sliding_window(model) -> int | None:
    """The shortest sliding window among the model's caches (None: no sliding layers)."""
    sizes = [c.max_size for c in make_prompt_cache(model) if isinstance(c, RotatingKVCache)]
    return min(sizes) if sizes else None


def cache_shapes(model) -> dict:
    """{layer index: (KV heads, key head dim, value head dim)} of every cached layer, from one token's forward."""
    caches = make_prompt_cache(model)
    model(mx.array([[0]]), cache=caches)
    return {i: (c.keys.shape[1], c.keys.shape[3], c.values.shape[3]) for i, c in enumerate(caches) if isinstance(c, (KVCache, RotatingKVCache))}


def kv_probes(model, candidates, shapes=None) -> list:
    """[(layer index, candidate)] of every probe measure_kv runs, in order:
    affine candidates whose group divides both head dims (MLX groups run
    along the head dimension), TurboQuant ones (their group is the head
    dimension) on full-attention layers with equal key and value dims."""
    shapes = shapes or cache_shapes(model)
    todo = []
    for i, kind in cache_layers(model):
        _, dk, dv = shapes[i]
        for c in candidates:
            if c.mode == "turbo":
                if kind == "full" and c.bits <= 4 and dk == dv and dk % 32 == 0:
                    todo.append((i, Candidate(c.bits, dk, "turbo")))
            elif c.bits < 16 and dk % c.group_size == 0 and dv % c.group_size == 0:
                todo.append((i, c))
    return todo


def run_with_cache(model, tokens: mx.array, caches: list, prefill: int) -> mx.array:
    """Logits for every position: one prefill call, then one call per token."""
    logits = [model(tokens[:, :prefill], cache=caches)]
    for t in range(prefill, tokens.shape[1]):
        logits.append(model(tokens[:, t : t + 1], cache=caches))
        mx.eval(logits[-1])
    return mx.concatenate(logits, axis=1).astype(mx.float32)


def _replayed(model, tokens, caches, start: int, inputs: list) -> mx.array:
    """Logits of one prefill with blocks before `start` replaced by the
    recorded input of block `start` (their caches stay empty, unread)."""
    blocks = block_list(model)
    with blocks_replaced(blocks, replaying_from(list(blocks), start, inputs[start] if start > 0 else None)):
        return model(tokens, cache=caches).astype(mx.float32)


def _reference_inputs(model, tokens) -> tuple:
    """(logits, every block's input) of one unquantized prefill."""
    blocks = block_list(model)
    inputs = []
    with blocks_replaced(blocks, recording(list(blocks), inputs)):
        logits = model(tokens, cache=make_prompt_cache(model)).astype(mx.float32)
        mx.eval(logits, inputs)
    return logits, inputs


def measure_kv(model, tokens, candidates, prefill: int | None = None, kl_stride: int = 1, on_probe=run_it, gather=None) -> SensitivityTable:
    """The KV sensitivity table; a layer's `n_params` is its KV elements per token.
    `prefill`: run N tokens as a prefill and decode the rest (default: one
    prefill of everything, replayed from the probed layer). `kl_stride`: KL
    at every Nth position only (each still sees its whole context); with a
    large vocabulary the head dominates a probe and this divides its cost.
    Each probe goes through `on_probe` (probe_hooks.py); `gather` merges the
    probes of several processes."""
    owner = norm_owner(model)
    tokens_mx = mx.array(np.asarray(tokens, dtype=np.int32))
    positions = mx.arange(kl_stride - 1, tokens_mx.shape[1], kl_stride) if kl_stride > 1 else None
    replay = prefill is None and not shared_kv_owners(model)
    if replay:
        with positions_only(owner, positions):
            logits, inputs = _reference_inputs(model, tokens_mx)
    else:
        logits = run_with_cache(model, tokens_mx, make_prompt_cache(model), prefill or tokens_mx.shape[1])
        logits = logits if positions is None else logits[:, positions]
    ref = metrics.reference_from_logits(logits)
    del logits
    shapes = cache_shapes(model)
    todo = kv_probes(model, candidates, shapes)
    kls = {}
    for n, (i, c) in enumerate(todo):
        def run(i=i, c=c):
            caches = make_kv_cache(model, [KVEntry(i, c.bits, c.group_size, c.mode, c.v_bits)])
            if replay:
                with positions_only(owner, positions):
                    got = _replayed(model, tokens_mx, caches, i, inputs)
            else:
                got = run_with_cache(model, tokens_mx, caches, prefill or tokens_mx.shape[1])
                got = got if positions is None else got[:, positions]
            return float(mx.mean(metrics.token_kl(ref, got)))

        kl = on_probe(n, f"kv.{i}", c, run)
        if kl is not None:
            kls[(i, c)] = kl
    if gather is not None:
        kls = gather(kls, todo)
    out = []
    for i, kind in cache_layers(model):
        heads, dk, dv = shapes[i]
        per_token = int(heads * (dk + dv))
        cands = [c for j, c in todo if j == i]
        cands = [*cands, UNQUANTIZED]
        out.append(
            LayerSensitivity(
                path=f"kv.{i}",
                n_params=per_token,
                candidates=cands,
                kl=[kls.get((i, c), 0.0) for c in cands],
                measured=[c.bits >= 16 or (i, c) in kls for c in cands],
                error=[0.0] * len(cands),
                calibration_digest=digest(tokens),
                roles=(kind,),
            )
        )
    return SensitivityTable(model="", layers=tuple(out), calibration_digest=digest(tokens), n_tokens=int(tokens_mx.size), method="kv probes, one prefill replayed from each layer" if replay else f"kv probes, prefill {prefill}, then decoding")
