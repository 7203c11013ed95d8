"""Estimators: a layer's cost without a probe.

The weight-space output error tr(dW X^T X dW^T) summed over the calibration
tokens (an embedding's lookups weigh its rows by how often each token
occurs) predicts how much quantizing the layer moves the logits. Anchored
measurement probes some candidates per layer and predicts the rest from
this error with a per-layer power law (`predict_kl`); the proxy table uses
no per-layer probes at all, one global scale from a single whole-model probe.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .records import LayerSensitivity, SensitivityTable
from .rounding import Rounding, row_slabs
from .standins import weights_swapped


def weighting(path: str, module, rounding: Rounding, token_counts):
    """(Gram of the layer's input ({expert: Gram} for an expert stack), or
    None; per-row token counts for an embedding's lookups, or None)."""
    gram = rounding.gram_for(path, module)
    if gram is not None or not isinstance(module, nn.Embedding):
        return gram, None
    counts = np.zeros(module.weight.shape[0], dtype=np.float32)
    k = min(len(token_counts), len(counts))
    counts[:k] = token_counts[:k]
    return None, counts


def weighted_error(dw: mx.array, rows, gram, counts) -> float:
    """tr(dW G dW^T) for these rows; lookups weigh rows by token counts; else
    plain squares. An expert stack's rows are experts, each weighed by its
    own Gram (an expert no token reached costs nothing on the calibration)."""
    if isinstance(gram, dict):
        first = rows.start or 0
        return sum(float(mx.sum((dw[e - first] @ gram[e]) * dw[e - first])) for e in range(first, first + dw.shape[0]) if e in gram)
    if gram is not None:
        return float(mx.sum((dw @ gram) * dw))
    if counts is not None:
        return float(mx.sum(mx.sum(dw * dw, axis=1) * mx.array(counts[rows])))
    return float(mx.sum(dw * dw))


def output_error(path: str, module, candidate, rounding: Rounding, token_counts) -> float:
    """Weight-space output error of `module` at `candidate`. Rows are
    independent (groups run along a row), so a large layer (a 49k-row
    embedding) is taken a slab of rows at a time: a few MB live instead of
    several fp32 copies of the whole matrix."""
    weights = weighting(path, module, rounding, token_counts)  # once: a streamed Gram is a read from disk
    mx.eval(module.weight)  # once, not once per slab (a streamed weight is a lazy read)
    total = 0.0
    for rows in row_slabs(module.weight.shape):
        w = module.weight[rows].astype(mx.float32)
        total += weighted_error(rounding.quantized(path, module, w, candidate, rows) - w, rows, *weights)
    return total


def whole_layer_error(path: str, module, dw: mx.array, rounding: Rounding, token_counts) -> float:
    """The output error of a whole-layer change `dw` (a probe's GPTQ weight
    minus the original), equal to output_error's slabbed sum."""
    return weighted_error(dw, slice(None), *weighting(path, module, rounding, token_counts))


def predict_kl(errors, anchor_errors, anchor_kls):
    """KL for every candidate from a power law KL = a * error^alpha fitted to anchors.

    One anchor: alpha = 1 (KL is quadratic in a small perturbation, as is the
    output error). Several: least squares in log-log space, alpha in [0.5, 2].
    """
    e = np.maximum(np.asarray(errors, dtype=np.float64), 1e-30)
    ae = np.maximum(np.asarray(anchor_errors, dtype=np.float64), 1e-30)
    ak = np.maximum(np.asarray(anchor_kls, dtype=np.float64), 1e-12)
    alpha = 1.0
    if len(ae) >= 2 and np.ptp(np.log(ae)) > 1e-6:
        alpha = float(np.clip(np.polyfit(np.log(ae), np.log(ak), 1)[0], 0.5, 2.0))
    log_a = float(np.mean(np.log(ak) - alpha * np.log(ae)))
    return np.exp(log_a + alpha * np.log(e))


def proxy_table(reference, rounding: Rounding, plan, model_id, reference_name, cal_digest, n_tokens, roles_of) -> SensitivityTable:
    """The fast estimator: KL proportional to each layer's weight-space output
    error, with one global scale set by a single whole-model probe (every layer
    at its middle candidate). No per-layer probes."""
    counts = reference.token_counts
    errors = {path: [output_error(path, module, c, rounding, counts) for c in cands] for path, module, cands, _ in plan}
    middle = [(path, module, len(cands) // 2, cands) for path, module, cands, _ in plan if cands]
    with weights_swapped((module, rounding.quantized(path, module, module.weight, cands[i])) for path, module, i, cands in middle):
        whole = reference.probe(0)
    index = {path: i for path, _, i, _ in middle}
    scale = whole / max(sum(errors[p][i] for p, i in index.items()), 1e-30)
    layers = tuple(
        LayerSensitivity(
            path=path,
            n_params=int(module.weight.size),
            candidates=cands,
            kl=[scale * e for e in errors[path]],
            measured=[False] * len(cands),
            error=errors[path],
            calibration_digest=cal_digest,
            reference=reference_name,
            roles=roles_of(module),
        )
        for path, module, cands, _ in plan
    )
    return SensitivityTable(model=model_id, layers=layers, calibration_digest=cal_digest, n_tokens=n_tokens, reference=reference_name, method="proxy: output error x one global scale")
