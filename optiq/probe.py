"""Whole-model probes for families outside mlx-lm (Whisper, vision-language):
quantize one layer, run the family's own forward pass on cached calibration
inputs, read the KL of its output distribution against the float reference.

mlx-lm text models take the faster block-cached path in sensitivity.py; these
families are small or have encoders whose outputs feed every decoder
position, so each probe runs the whole forward pass (Whisper skips its
encoder when a decoder layer is probed)."""

import mlx.core as mx
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


def probe_layers(layers, candidates, kl_of, progress: bool = False, calibration_digest: str = "") -> tuple:
    """A LayerSensitivity per (path, module): each candidate fake-quantized in
    place, kl_of(path) measured, the weight restored."""
    from tqdm.auto import tqdm

    todo = [(p, m, candidates_for(m, candidates)) for p, m in layers]
    bar = tqdm(total=sum(len(c) for *_, c in todo), desc="sensitivity", unit="probe", disable=not progress)
    out = []
    for path, module, cands in todo:
        kls, errors = [], []
        original = module.weight
        for c in cands:
            bar.update(1)
            if c.bits >= 16:
                kls.append(0.0)
                errors.append(0.0)
                continue
            module.weight = fake_quantize(original, c)
            try:
                kls.append(float(kl_of(path)))
                errors.append(float(mx.sum((module.weight - original) ** 2)))
            finally:
                module.weight = original
        out.append(LayerSensitivity(path=path, n_params=int(original.size), candidates=cands, kl=kls, measured=[True] * len(cands), error=errors, calibration_digest=calibration_digest))
    bar.close()
    return tuple(out)


def probe_table(layers, candidates, kl_of, token_arrays, model_id: str, method: str, progress: bool = False) -> SensitivityTable:
    """probe_layers as a SensitivityTable; token_arrays identify the calibration."""
    from .calibration import digest

    flat = np.concatenate([np.asarray(t).reshape(-1) for t in token_arrays])
    cal_digest = digest(flat)
    probed = probe_layers(layers, candidates, kl_of, progress, cal_digest)
    return SensitivityTable(model=model_id, layers=probed, calibration_digest=cal_digest, n_tokens=int(flat.size), reference="fp32", method=method)
