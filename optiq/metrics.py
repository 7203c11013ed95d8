"""KL divergence, top-1 agreement and perplexity, shared by sensitivity, eval
and the benchmarks. All in fp32 over (tokens, vocab) logits."""

import attrs
import mlx.core as mx


@attrs.frozen
class Reference:
    """What the reference model's logits say about a batch of tokens.

    KL(p || q) = sum p log p - sum p z_q + logsumexp(z_q): with the first term
    and p stored, each probe costs one logsumexp and one dot product.
    """

    probs: mx.array  # (T, V)
    neg_entropy: mx.array  # (T,)  sum_v p log p
    top1: mx.array  # (T,)


def _flat(logits: mx.array) -> mx.array:
    return logits.reshape(-1, logits.shape[-1]).astype(mx.float32)


def reference_from_logits(logits: mx.array) -> Reference:
    z = _flat(logits)
    logp = z - mx.logsumexp(z, axis=-1, keepdims=True)
    probs = mx.exp(logp)
    neg_entropy = mx.sum(probs * logp, axis=-1)
    ref = Reference(probs, neg_entropy, mx.argmax(z, axis=-1))
    mx.eval(ref.probs, ref.neg_entropy, ref.top1)
    return ref


@mx.compile
def _kl(probs, neg_entropy, z):
    return neg_entropy - mx.sum(probs * z, axis=-1) + mx.logsumexp(z, axis=-1)


def token_kl(ref: Reference, logits: mx.array) -> mx.array:
    """Per-token KL(reference || model), clamped at 0 against rounding."""
    return mx.maximum(_kl(ref.probs, ref.neg_entropy, _flat(logits)), 0.0)


def top1_agreement(ref: Reference, logits: mx.array) -> mx.array:
    """Per-token 1.0 where the model's argmax equals the reference's."""
    return (mx.argmax(_flat(logits), axis=-1) == ref.top1).astype(mx.float32)


def token_nll(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token negative log-likelihood of `targets` (same leading shape as logits)."""
    z = _flat(logits)
    t = targets.reshape(-1)
    picked = mx.take_along_axis(z, t[:, None], axis=-1)[:, 0]
    return mx.logsumexp(z, axis=-1) - picked
