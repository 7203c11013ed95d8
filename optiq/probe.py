"""Whole-model probes for families outside mlx-lm (Whisper, vision-language):
quantize one layer, run the family's own forward pass on cached calibration
inputs, read the KL of its output distribution against the float reference.

mlx-lm text models take the faster block-cached path in sensitivity.py; these
families are small or have encoders whose outputs feed every decoder
position, so each probe runs the whole forward pass (Whisper skips its
encoder when a decoder layer is probed). Rounding is MLX's own, or GPTQ with
each Linear's input Gram recorded over the calibration passes."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import metrics
from .records import LayerSensitivity, SensitivityTable
from .sensitivity import candidates_for, fake_quantize


def logits_kl(pairs) -> dict:
    """Mean KL and top-1 agreement over every position of [(Reference, logits)]."""
    kl_sum, top1, count = 0.0, 0.0, 0
    for ref, logits in pairs:
        kl = metrics.token_kl(ref, logits)
        kl_sum += float(mx.sum(kl))
        top1 += float(mx.sum(metrics.top1_agreement(ref, logits)))
        count += kl.size
    return {"kl_mean": kl_sum / max(count, 1), "top1": top1 / max(count, 1), "n_tokens": count}


class GramRecorder(nn.Module):
    """Stands in for a Linear during the reference passes: adds X^T X of its inputs."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear
        self.gram = mx.zeros((linear.weight.shape[-1],) * 2, dtype=mx.float32)

    def __call__(self, x):
        rows = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self.gram = self.gram + rows.T @ rows
        return self.linear(x)


def record_grams(model, layers, forward_each) -> dict:
    """{path: X^T X} of every Linear's inputs over the calibration forward
    passes that iterating forward_each() runs, one at a time."""
    from .sensitivity import container_of

    swapped = []
    try:
        for path, module in layers:
            if isinstance(module, nn.Linear):
                container, key = container_of(model, path)
                container[key] = GramRecorder(module)
                swapped.append((path, container, key, module))
        for _ in forward_each():
            mx.eval([container[key].gram for _, container, key, _ in swapped])
    finally:
        grams = {}
        for path, container, key, module in swapped:
            grams[path] = container[key].gram
            container[key] = module
    return grams


class Rounding:
    """How a layer is rounded: MLX's round-to-nearest, or GPTQ onto MLX's grid
    with the Gram of the layer's calibration inputs (Linears only). The same
    interface as sensitivity.Calibrated, so evaluate.simulated and the
    writers take either."""

    def __init__(self, quantizer: str = "rtn", grams=None):
        self.quantizer, self.grams = quantizer, grams or {}

    def uses_gptq(self, path: str, candidate) -> bool:
        return self.quantizer == "gptq" and candidate.bits < 16 and path in self.grams

    def quantized(self, path: str, module, weight: mx.array, candidate) -> mx.array:
        from .sensitivity import gptq_weight

        if self.uses_gptq(path, candidate):
            return gptq_weight(weight, self.grams[path], candidate)[0]
        return fake_quantize(weight, candidate)

    def codes(self, path: str, module, weight: mx.array, candidate):
        """(codes, scales, biases) to write, or None where MLX's rounding is used."""
        from .sensitivity import gptq_weight

        return gptq_weight(weight, self.grams[path], candidate)[1] if self.uses_gptq(path, candidate) else None


def gram_rounding(model, layers, quantizer: str, forward_each) -> Rounding:
    """A Rounding for `quantizer`; for GPTQ the Grams come from running
    forward_each() (every calibration forward pass, in order)."""
    if quantizer != "gptq":
        return Rounding(quantizer)
    return Rounding(quantizer, record_grams(model, layers, forward_each))


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


def probe_layers(layers, candidates, kl_of, progress: bool = False, calibration_digest: str = "", rounding=None, twins=None) -> tuple:
    """A LayerSensitivity per (path, module): each candidate quantized in
    place (by `rounding`, default MLX's; twins take the same weight),
    kl_of(path) measured, the weights restored."""
    from tqdm.auto import tqdm

    rounding, twins = rounding or Rounding(), twins or {}

    todo = [(p, m, candidates_for(m, candidates)) for p, m in layers]
    bar = tqdm(total=sum(len(c) for *_, c in todo), desc="sensitivity", unit="probe", disable=not progress)
    out = []
    for path, module, cands in todo:
        kls, errors = [], []
        original = module.weight
        copies = [module] + [m for _, m in twins.get(path, ())]
        for c in cands:
            bar.update(1)
            if c.bits >= 16:
                kls.append(0.0)
                errors.append(0.0)
                continue
            weight = rounding.quantized(path, module, original, c)
            for m in copies:
                m.weight = weight
            try:
                kls.append(float(kl_of(path)))
                errors.append(float(mx.sum((weight - original) ** 2)))
            finally:
                for m in copies:
                    m.weight = original
        out.append(LayerSensitivity(path=path, n_params=int(original.size) * len(copies), candidates=cands, kl=kls, measured=[True] * len(cands), error=errors, calibration_digest=calibration_digest))
    bar.close()
    return tuple(out)


def probe_table(layers, candidates, kl_of, token_arrays, model_id: str, method: str, progress: bool = False, rounding=None, twins=None) -> SensitivityTable:
    """probe_layers as a SensitivityTable; token_arrays identify the calibration."""
    from .calibration import digest

    flat = np.concatenate([np.asarray(t).reshape(-1) for t in token_arrays])
    cal_digest = digest(flat)
    probed = probe_layers(layers, candidates, kl_of, progress, cal_digest, rounding, twins)
    return SensitivityTable(model=model_id, layers=probed, calibration_digest=cal_digest, n_tokens=int(flat.size), reference="fp32", method=method)
