"""Quality of a model against a reference on held-out tokens: mean and
99th-percentile KL, top-1 agreement, perplexity. fp32 throughout."""

from contextlib import contextmanager

import mlx.core as mx
import numpy as np

from . import metrics
from .model_tree import module_at
from .rounding import Rounding
from .standins import weights_swapped


def batches(tokens, batch_size: int):
    tokens = mx.array(np.asarray(tokens, dtype=np.int32))
    return [tokens[i : i + batch_size] for i in range(0, tokens.shape[0], batch_size)]


def reference_batches(model, tokens, batch_size: int = 8) -> list:
    """The reference's view of each batch (computed once, compared many times)."""
    return [metrics.reference_from_logits(model(b)) for b in batches(tokens, batch_size)]


def quality(model, tokens, refs, batch_size: int = 8) -> dict:
    """KL (mean, p99), top-1 agreement and perplexity of `model` on `tokens`."""
    kls, agree, nll = [], [], []
    for batch, ref in zip(batches(tokens, batch_size), refs):
        logits = model(batch)
        kls.append(np.array(metrics.token_kl(ref, logits)))
        agree.append(np.array(metrics.top1_agreement(ref, logits)))
        nll.append(np.array(metrics.token_nll(logits[:, :-1], batch[:, 1:])))
    kl = np.concatenate(kls)
    return {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "top1": float(np.concatenate(agree).mean()),
        "perplexity": float(np.exp(np.concatenate(nll).mean())),
    }


@contextmanager
def simulated(model, assignments, rounding: Rounding | None = None):
    """The model with every planned layer quantized then dequantized (fp32)
    by `rounding` (default: MLX's round-to-nearest, fp16 scales), restored
    on exit: how a plan would behave, without writing it."""
    rounding = rounding or Rounding()
    pairs = []
    for path, candidate in assignments:
        module = module_at(model, path)
        pairs.append((module, rounding.quantized(path, module, module.weight, candidate)))
    with weights_swapped(pairs) as modules:
        mx.eval([m.weight for m in modules])
        yield model
