"""Weight sensitivity: KL(reference || model with one layer quantized).

A probe quantizes one layer with the conversion's rounding, replays the
reference pass's cached input of that layer's block and runs only the blocks
from there to the logits (reference.py). Probing every candidate of every
layer is the exact table; with `anchors`, only candidates of those
bit-widths are probed and the rest are predicted from the layer's
weight-space output error (estimate.py). With no anchors at all
(`anchors=set()`) the proxy estimator replaces every probe.

The stage owns no progress bar, cache or process schedule: each probe goes
through the caller's `on_probe` (probe_hooks.py), and `gather` merges what
several processes measured.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import metrics
from .calibration import digest
from .estimate import output_error, predict_kl, proxy_table, whole_layer_error
from .grams import record_grams
from .model_tree import candidates_for, in_block, is_tied, start_block
from .probe_hooks import run_it
from .records import Candidate, LayerSensitivity, SensitivityTable, sort_candidates
from .reference import ReferencePass, reference_pass
from .rounding import Rounding, quantize_rows
from .standins import SlabbedCodes, module_swapped, weights_swapped


def probe_plan(layers, candidates, anchors) -> list:
    """[(path, module, candidates that fit, candidates to probe)] per layer.
    anchors None: probe all; a set of bit-widths: probe those (the middle
    candidate where none fits the layer); empty: probe none (proxy)."""
    plan = []
    for path, module in layers:
        cands = candidates_for(module, candidates)
        todo = [c for c in cands if anchors is None or c.bits in anchors]
        if cands and not todo and anchors != set():
            todo = [cands[len(cands) // 2]]
        plan.append((path, module, cands, todo))
    return plan


def probe_one(reference: ReferencePass, rounding: Rounding, path: str, module, candidate: Candidate):
    """(KL with only `path` at `candidate`, the layer's output error when the
    probe had to compute GPTQ's weight anyway, else None). Streaming, a
    resident layer (a 49k-row embedding) goes back to disk once its codes are
    made and the probe runs on the codes (SlabbedCodes), so it is never held
    twice; it is read again when next used."""
    streamed = reference.streamed
    start = start_block(path, len(reference.blocks))
    on_disk = streamed.lazy_weight(path) if streamed is not None and not in_block(path) else None
    try:
        if on_disk is not None and candidate.bits < 16 and not rounding.uses_gptq(path, module, candidate):
            codes = quantize_rows(module.weight, candidate, rounding.dtype)
            module.weight = on_disk  # the evaluated original goes for good: a lazy read from now on
            with module_swapped(reference.model, path, SlabbedCodes(module, codes, candidate)):
                return reference.probe(start), None
        original = module.weight
        weight = rounding.quantized(path, module, original, candidate)
        error = whole_layer_error(path, module, weight - original, rounding, reference.token_counts) if rounding.uses_gptq(path, module, candidate) else None
        with weights_swapped([(module, weight)]):
            return reference.probe(start), error
    finally:
        if streamed is not None and in_block(path):  # the probed block's weights back to disk
            streamed.unload(start)


def run_probes(reference: ReferencePass, rounding: Rounding, plan, on_probe=run_it):
    """({(path, candidate): KL} for this process's probes, {(path, candidate):
    output error} the GPTQ probes computed on the way)."""
    probed, errors = {}, {}
    probes = [(path, module, c) for path, module, _, todo in plan for c in todo]
    for n, (path, module, c) in enumerate(probes):
        def run(path=path, module=module, c=c):
            kl, error = probe_one(reference, rounding, path, module, c)
            if error is not None:
                errors[(path, c)] = error
            return kl

        kl = on_probe(n, path, c, run)
        if kl is not None:
            probed[(path, c)] = kl
    return probed, errors


def probe_keys(plan) -> list:
    """Every probe of a plan, in the order run_probes runs them."""
    return [(path, c) for path, _, _, todo in plan for c in todo]


def table_from_probes(reference: ReferencePass, rounding: Rounding, plan, probed: dict, known_errors: dict, model_id: str, reference_name: str, method: str) -> SensitivityTable:
    """Every candidate's KL: measured where probed, else predicted from the
    layer's output error and its probed anchors."""
    tied = is_tied(reference.model)
    streamed = reference.streamed
    cal_digest = digest(np.asarray(reference.tokens))
    layers = []
    for path, module, cands, todo in plan:
        errors = [known_errors[(path, c)] if (path, c) in known_errors else output_error(path, module, c, rounding, reference.token_counts) for c in cands]
        if streamed is not None and in_block(path):
            streamed.unload(start_block(path, len(reference.blocks)))
        measured = {c: probed[(path, c)] for c in todo}
        idx = [cands.index(c) for c in todo]
        predicted = predict_kl(errors, [errors[i] for i in idx], [measured[c] for c in todo])
        layers.append(
            LayerSensitivity(
                path=path,
                n_params=int(module.weight.size),
                candidates=cands,
                kl=[measured.get(c, float(p)) for c, p in zip(cands, predicted)],
                measured=[c in measured for c in cands],
                error=errors,
                calibration_digest=cal_digest,
                reference=reference_name,
                roles=_roles(module, tied),
            )
        )
    return SensitivityTable(model=model_id, layers=tuple(layers), calibration_digest=cal_digest, n_tokens=int(reference.tokens.size), reference=reference_name, method=method)


def _roles(module, tied: bool) -> tuple:
    return ("embedding", "lm_head") if tied and isinstance(module, nn.Embedding) else ()


def rounding_for(reference: ReferencePass, quantizer: str = "rtn", dtype=None, refit: bool = True) -> Rounding:
    """The Rounding whose Grams are this reference pass's."""
    kwargs = {} if dtype is None else {"dtype": dtype}
    return Rounding(quantizer, grams=reference.grams, head_gram=reference.head_gram, refit=refit, **kwargs)


def measure_weights(model, tokens, candidates, anchors=None, model_id: str = "", reference_name: str = "fp32",
                    batch_size: int = 8, kl_stride: int = 4, reference: ReferencePass | None = None,
                    rounding: Rounding | None = None, streamed=None, on_probe=run_it, gather=None) -> SensitivityTable:
    """The sensitivity table of `model` on calibration `tokens`.

    anchors: None probes every candidate; otherwise a set of bit-widths to
    probe, the other candidates predicted from weight-space error (an empty
    set: the proxy estimator, no probes). reference: a reference pass to
    reuse (else one is run); rounding: the quantizer and stored dtype
    (default: round-to-nearest, fp16, with the pass's Grams). gather:
    merges the probes several processes measured, {key: KL} for every key."""
    candidates = sort_candidates(candidates)
    reference = reference or reference_pass(model, tokens, batch_size, kl_stride, streamed=streamed)
    rounding = rounding or rounding_for(reference)
    plan = probe_plan(reference.layers, candidates, anchors)
    cal_digest = digest(np.asarray(reference.tokens))
    if anchors is not None and len(anchors) == 0:
        tied = is_tied(model)
        return proxy_table(reference, rounding, plan, model_id, reference_name, cal_digest, int(reference.tokens.size), lambda m: _roles(m, tied))
    probed, errors = run_probes(reference, rounding, plan, on_probe)
    if gather is not None:
        probed = gather(probed, probe_keys(plan))
    method = ("probe" if anchors is None else f"probe anchors {sorted(anchors)} + predicted") + f", {rounding.quantizer}"
    return table_from_probes(reference, rounding, plan, probed, errors, model_id, reference_name, method)


# -- whole-model probes (Whisper, vision-language models) ------------------------
#
# mlx-lm text models take the block-replaying path above; these families are
# small or have encoders whose outputs feed every decoder position, so each
# probe runs the family's whole forward pass (Whisper skips its encoder when a
# decoder layer is probed, mlx-vlm its vision tower when a language layer is).


def logits_kl(pairs) -> dict:
    """Mean KL and top-1 agreement over every position of [(reference distribution, logits)]."""
    kl_sum, top1, count = 0.0, 0.0, 0
    for ref, logits in pairs:
        kl = metrics.token_kl(ref, logits)
        kl_sum += float(mx.sum(kl))
        top1 += float(mx.sum(metrics.top1_agreement(ref, logits)))
        count += kl.size
    return {"kl_mean": kl_sum / max(count, 1), "top1": top1 / max(count, 1), "n_tokens": count}


def gram_rounding(model, layers, quantizer: str, forward_each, dtype=mx.float16, refit: bool = True) -> Rounding:
    """The Rounding for `quantizer`; for GPTQ the Grams come from running
    forward_each() (every calibration forward pass, in order)."""
    grams = record_grams(model, layers, forward_each) if quantizer == "gptq" else {}
    return Rounding(quantizer, dtype, grams, refit=refit)


def tied_layers(layers) -> tuple:
    """(layers without twins, {kept path: [(twin path, module)]}). Twins hold equal
    weights because the loader ties them (mlx-vlm's Gemma 3 copies the
    embedding into lm_head on every load), so they must be one plan entry:
    one candidate, the same codes, their storage counted once per copy."""
    kept, twins, by_shape = [], {}, {}
    for path, module in layers:
        same = next((p for p, m in by_shape.get(module.weight.shape, []) if mx.array_equal(m.weight, module.weight)), None)
        if same is None:
            kept.append((path, module))
            by_shape.setdefault(module.weight.shape, []).append((path, module))
        else:
            twins.setdefault(same, []).append((path, module))
    return kept, twins


def with_twins(assignments, twins: dict) -> tuple:
    """A plan's assignments with each twin given its kept layer's candidate."""
    return tuple(assignments) + tuple((t, c) for p, c in assignments for t, _ in twins.get(p, ()))


def probe_layers(layers, candidates, kl_of, rounding: Rounding, twins=None, calibration_digest: str = "", on_probe=run_it) -> tuple:
    """A LayerSensitivity per (path, module): each candidate quantized in
    place by `rounding` (twins take the same weight), kl_of(path) measured,
    the weights restored."""
    twins = twins or {}
    out, n = [], 0
    for path, module in layers:
        cands = candidates_for(module, candidates)
        original = module.weight
        copies = [module] + [m for _, m in twins.get(path, ())]
        kls, errors = [], []
        for c in cands:
            if c.bits >= 16:
                kls.append(0.0)
                errors.append(0.0)
                continue
            weight = rounding.quantized(path, module, original, c)

            def run(path=path, weight=weight, copies=copies):
                with weights_swapped((m, weight) for m in copies):
                    return float(kl_of(path))

            kls.append(on_probe(n, path, c, run))
            errors.append(float(mx.sum((weight - original) ** 2)))
            n += 1
        out.append(LayerSensitivity(path=path, n_params=int(original.size) * len(copies), candidates=cands, kl=kls, measured=[True] * len(cands), error=errors, calibration_digest=calibration_digest))
    return tuple(out)


def count_probes(layers, candidates) -> int:
    """How many probes probe_layers runs (for a progress bar's total)."""
    return sum(1 for _, m in layers for c in candidates_for(m, candidates) if c.bits < 16)


def probe_table(layers, candidates, kl_of, token_arrays, model_id: str, method: str, rounding: Rounding, twins=None, on_probe=run_it) -> SensitivityTable:
    """probe_layers as a SensitivityTable; token_arrays identify the calibration."""
    flat = np.concatenate([np.asarray(t).reshape(-1) for t in token_arrays])
    cal_digest = digest(flat)
    probed = probe_layers(layers, candidates, kl_of, rounding, twins, cal_digest, on_probe)
    return SensitivityTable(model=model_id, layers=probed, calibration_digest=cal_digest, n_tokens=int(flat.size), reference="fp32", method=method)
