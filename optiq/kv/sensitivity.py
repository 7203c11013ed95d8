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

from .. import distributed, metrics
from ..records import Candidate, LayerSensitivity, SensitivityTable
from .caches import make_kv_cache

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
    from ..sensitivity import _Stand, block_list

    blocks = block_list(model)
    originals = list(blocks)
    try:
        if start > 0:
            for j in range(start - 1):
                blocks[j] = _Stand(originals[j])
            blocks[start - 1] = _Stand(originals[start - 1], replay=inputs[start])
        return model(tokens, cache=caches).astype(mx.float32)
    finally:
        blocks[:] = originals


def _reference_inputs(model, tokens) -> tuple:
    """(logits, every block's input) of one unquantized prefill."""
    from ..sensitivity import _Stand, block_list

    blocks = block_list(model)
    originals = list(blocks)
    inputs = []
    try:
        for j, block in enumerate(originals):
            blocks[j] = _Stand(block, inputs=inputs)
        logits = model(tokens, cache=make_prompt_cache(model)).astype(mx.float32)
        mx.eval(logits, inputs)
    finally:
        blocks[:] = originals
    return logits, inputs


def measure_kv(model, tokens, candidates, prefill: int | None = None, progress: bool = True, kl_stride: int = 1) -> SensitivityTable:
    """The KV sensitivity table; a layer's `n_params` is its KV elements per token.
    `prefill`: run N tokens as a prefill and decode the rest (default: one
    prefill of everything, replayed from the probed layer). `kl_stride`: KL
    at every Nth position only (each still sees its whole context); with a
    large vocabulary the head dominates a probe and this divides its cost."""
    from tqdm.auto import tqdm

    from ..calibration import digest
    from ..sensitivity import norm_owner, positions_only
    from .caches import shared_kv_owners

    owner = norm_owner(model)
    tokens_mx = mx.array(np.asarray(tokens, dtype=np.int32))
    positions = mx.arange(kl_stride - 1, tokens_mx.shape[1], kl_stride) if kl_stride > 1 else None
    ref_caches = make_prompt_cache(model)
    replay = prefill is None and not shared_kv_owners(model)
    if replay:
        with positions_only(owner, positions):
            logits, inputs = _reference_inputs(model, tokens_mx)
        model(tokens_mx[:, :1], cache=ref_caches)  # shapes for the candidate checks below
    else:
        logits = run_with_cache(model, tokens_mx, ref_caches, prefill or tokens_mx.shape[1])
        logits = logits if positions is None else logits[:, positions]
    ref = metrics.reference_from_logits(logits)
    del logits
    layers = cache_layers(model)

    def fits(i, kind, c):  # MLX groups run along the head dimension; TurboQuant rotates whole heads
        dk, dv = ref_caches[i].keys.shape[3], ref_caches[i].values.shape[3]
        if c.mode == "turbo":
            return kind == "full" and c.bits <= 4 and dk == dv == c.group_size and dk % 32 == 0
        return c.bits < 16 and dk % c.group_size == 0 and dv % c.group_size == 0

    def head_candidates(i):  # a TurboQuant candidate's group is the head dimension
        d = ref_caches[i].keys.shape[3]
        return [Candidate(c.bits, d, "turbo") if c.mode == "turbo" else c for c in candidates]

    def probe_caches(i, c):
        entry = {"layer_idx": i, **c.to_dict()}
        return make_kv_cache(model, [entry])

    todo = [(i, c) for i, kind in layers for c in head_candidates(i) if fits(i, kind, c)]
    bar = tqdm(total=len(todo), desc="kv sensitivity", unit="probe", disable=not progress or not distributed.is_writer())
    kls = {}
    for n, (i, c) in enumerate(todo):
        bar.update(1)
        if not distributed.mine(n):  # another rank's probe (mlx.launch)
            continue
        caches = probe_caches(i, c)
        if replay:
            with positions_only(owner, positions):
                got = _replayed(model, tokens_mx, caches, i, inputs)
        else:
            got = run_with_cache(model, tokens_mx, caches, prefill or tokens_mx.shape[1])
            got = got if positions is None else got[:, positions]
        kls[(i, c)] = float(mx.mean(metrics.token_kl(ref, got)))
    bar.close()
    kls = distributed.gather(kls, todo)
    out = []
    for i, kind in layers:
        k = ref_caches[i]
        per_token = int(k.keys.shape[1] * (k.keys.shape[3] + k.values.shape[3]))  # heads x (Dk + Dv)
        cands = [c for c in head_candidates(i) if fits(i, kind, c)]
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
