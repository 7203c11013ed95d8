"""Learned rounding over a written plan: each quantized layer's scales and
biases (the integer codes stay as they are) are tuned so the model's
next-token distributions match the reference's, as mlx-lm's DWQ does, and
the result is still MLX's format, so stock mlx-lm loads it.

Optionally the codes train too (`code_lr`): each trained layer's codes
become a float latent, rounded (and clipped to the grid) in the forward pass
with a straight-through gradient, and packed back into MLX's words at the end
(`settle_codes`); Adam moves a latent about `code_lr` a step, so a code flips
after ~0.5 / code_lr steps of one-signed gradient. Optionally (`norm_lr`) the
norms' weights train too: still plain floats in the same format.

The loss is DWQ's: KL between the reference's and the model's softmax at
temperature 2, over the reference's top-k logits per position. State is
explicit: `tune_steps` takes the trainable parameters and the optimizer
state and returns them, so a caller can checkpoint and resume at any step.
Batches are a pure function of (seed, step), so a resumed run sees exactly
the batches an uninterrupted one would.

Why not mlx-lm's `dwq_quantize` as it is: it keeps its loop's state to
itself (no checkpoint, no resume), draws batches from one shuffled pass, and
returns nothing to measure; the loss and the layers it trains are the same.
"""

import attrs
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.losses import kl_div_loss

from .rounding import pack_mx


@attrs.frozen
class TuneConfig:
    steps: int = 200
    lr: float = 3e-6
    batch_size: int = 4
    temperature: float = 2.0
    top_k: int = 1024
    seed: int = 0
    max_bits: int = 8  # layers of fewer bits train: DWQ leaves 8-bit ones alone
    # "cosine": lr decays to 0 at `steps` (Adam's step count drives it, so resuming keeps it)
    schedule: str = attrs.field(default="constant", validator=attrs.validators.in_(("constant", "cosine")))
    # > 0: the norms' weights train too, at their own rate (they sit near 1,
    # a 4-bit scale near 1e-3, and Adam's step is absolute); 0 leaves them, as DWQ does
    norm_lr: float = 0.0
    # > 0: the trained layers' integer codes train too (straight-through rounding), at this rate
    code_lr: float = 0.0


class CodeTunedLinear(nn.QuantizedLinear):
    """An affine QuantizedLinear whose codes are a trainable float latent
    (`codes`, out x in): the forward rounds and clips it to the grid, with
    the gradient passed straight through, and computes with the dequantized
    weight, exactly the layer `settle_codes` writes."""

    def __call__(self, x):
        top = 2**self.bits - 1
        q = self.codes + mx.stop_gradient(mx.clip(mx.round(self.codes), 0, top) - self.codes)
        rows, cols = q.shape
        w = q.reshape(rows, -1, self.group_size) * self.scales[..., None] + self.biases[..., None]
        y = x @ w.reshape(rows, cols).astype(x.dtype).T
        return y + self["bias"] if "bias" in self else y


def codes_of(layer: nn.QuantizedLinear) -> mx.array:
    """An affine layer's integer codes as fp32 (out x in): its words
    dequantized with unit scales and zero biases."""
    ones = mx.ones(layer.scales.shape, dtype=mx.float32)
    return mx.dequantize(layer.weight, ones, mx.zeros_like(ones), group_size=layer.group_size, bits=layer.bits)


def packed_codes(latent: mx.array, bits: int) -> mx.array:
    """MLX's uint32 words of a latent's codes (rounded, clipped to the grid)."""
    return pack_mx(mx.clip(mx.round(latent), 0, 2**bits - 1).astype(mx.uint32), bits)


def release_codes(model: nn.Module, max_bits: int = 8) -> int:
    """Give the affine QuantizedLinear layers under `max_bits` a trainable
    float latent of their codes (in place; `settle_codes` undoes it); returns
    how many codes train. Embeddings keep theirs: a tied head's codes are
    also the input table, and a latent of the vocabulary is large."""
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear) and not isinstance(m, CodeTunedLinear) and m.mode == "affine" and m.bits < max_bits:
            m.codes = codes_of(m)
            m.settled_class = type(m)  # a plain attribute: not a parameter
            m.__class__ = CodeTunedLinear
            m.unfreeze(keys=["codes"], recurse=False)
            n += m.codes.size
    return n


def settle_codes(model: nn.Module) -> nn.Module:
    """Pack every latent back into the layer's words and restore its class
    (in place): the model is MLX's format again."""
    for _, m in model.named_modules():
        if isinstance(m, CodeTunedLinear):
            m.weight = packed_codes(m.codes, m.bits)
            del m["codes"]
            m.__class__ = m.settled_class
            del m.settled_class
    return model


def written_values(params, model: nn.Module) -> dict:
    """A parameter tree as the written model's flat {name: array}: each code
    latent becomes its layer's packed `weight` (the layer's bits from `model`)."""
    modules = dict(model.named_modules())
    out = {}
    for name, value in tree_flatten(params):
        if name.endswith(".codes"):
            path = name[: -len(".codes")]
            out[f"{path}.weight"] = packed_codes(value, modules[path].bits)
        else:
            out[name] = value
    return out


def is_norm(module: nn.Module) -> bool:
    """RMSNorm, LayerNorm and the model files' own norm classes (Gemma's RMSNorm)."""
    return type(module).__name__.endswith("Norm") and "weight" in module


def unfreeze_scales(model: nn.Module, max_bits: int = 8, norms: bool = False) -> int:
    """Freeze everything but the scales and biases of affine layers under
    `max_bits` (DWQ's 8: 8-bit layers gain little), and the norms' weights
    where `norms`; returns how many values train."""
    model.freeze()

    def unfreeze(_, m):
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and m.mode == "affine" and m.bits < max_bits:
            m.unfreeze(keys=["scales", "biases"], recurse=False)
        elif norms and is_norm(m):
            m.unfreeze(keys=["weight"], recurse=False)

    model.apply_to_modules(unfreeze)
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def batch_rows(n_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row indices of step `step`'s batch: one fresh permutation per epoch."""
    per_epoch = max(1, n_rows // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    return order[k * batch_size : (k + 1) * batch_size]


def reference_targets(reference: nn.Module, batch: mx.array, top_k: int) -> tuple:
    """(top-k logits, their token ids) of the reference at every position."""
    logits = mx.stop_gradient(reference(batch)).astype(mx.float32)
    k = min(top_k, logits.shape[-1])
    ids = mx.argpartition(logits, kth=-k, axis=-1)[..., -k:]
    return mx.take_along_axis(logits, ids, axis=-1), ids


def distill_loss(model: nn.Module, batch: mx.array, targets: tuple, temperature: float) -> mx.array:
    values, ids = targets
    logits = mx.take_along_axis(model(batch).astype(mx.float32), ids, axis=-1)
    return kl_div_loss(logits / temperature, values / temperature).mean()


def start(model: nn.Module, config: TuneConfig) -> tuple:
    """(trainable parameters in fp32, a fresh optimizer) for `model`."""
    unfreeze_scales(model, config.max_bits, norms=config.norm_lr > 0)
    if config.code_lr > 0:
        release_codes(model, config.max_bits)
    params = tree_map(lambda x: x.astype(mx.float32), model.trainable_parameters())

    def rate(lr):
        return optim.cosine_decay(lr, config.steps) if config.schedule == "cosine" else lr

    # Every trainable "weight" is a norm's (quantized weights are frozen; trained codes are "codes").
    groups = [(lr, suffix) for lr, suffix in ((config.code_lr, ".codes"), (config.norm_lr, ".weight")) if lr > 0]
    opt = optim.Adam(learning_rate=rate(config.lr))
    if groups:
        opt = optim.MultiOptimizer([optim.Adam(learning_rate=rate(lr)) for lr, _ in groups] + [opt],
                                   [lambda path, _, suffix=suffix: path.endswith(suffix) for _, suffix in groups])
    opt.init(params)
    return params, opt


def tune_steps(model: nn.Module, reference: nn.Module, tokens: np.ndarray, params, opt, first: int, last: int,
               config: TuneConfig, on_step=None) -> tuple:
    """Steps first..last-1 from (params, opt); returns (params, opt, losses).
    The model is updated in place to the tuned values (in its own dtypes)."""
    dtypes = tree_map(lambda x: x.dtype, model.trainable_parameters())

    def loss_fn(p, batch, targets):
        model.update(tree_map(lambda x, d: x.astype(d), p, dtypes))
        return distill_loss(model, batch, targets, config.temperature)

    grad = mx.value_and_grad(loss_fn)
    tokens = np.asarray(tokens, dtype=np.int32)
    losses = []
    for step in range(first, last):
        batch = mx.array(tokens[batch_rows(len(tokens), config.batch_size, config.seed, step)])
        targets = reference_targets(reference, batch, config.top_k)
        mx.eval(targets)
        loss, g = grad(params, batch, targets)
        params = opt.apply_gradients(g, params)
        mx.eval(loss, params, opt.state)
        losses.append(float(loss))
        if on_step is not None:
            on_step(step + 1, params, opt, losses[-1])
    model.update(tree_map(lambda x, d: x.astype(d), params, dtypes))
    return params, opt, losses


def state_arrays(params, opt, step: int) -> dict:
    """One flat {name: array} for safetensors: parameters, Adam's moments, the step."""
    flat = {f"param.{k}": v for k, v in tree_flatten(params)}
    flat.update({f"opt.{k}": v for k, v in tree_flatten(opt.state)})
    flat["step"] = mx.array(step)
    return flat


def restore(arrays: dict, opt) -> tuple:
    """(params, opt, step) from `state_arrays`' output, into a fresh optimizer."""
    params = tree_unflatten([(k[6:], v) for k, v in arrays.items() if k.startswith("param.")])
    opt.state = tree_unflatten([(k[4:], v) for k, v in arrays.items() if k.startswith("opt.")])
    return params, opt, int(arrays["step"].item())
