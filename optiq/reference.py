"""The reference pass: one run of the unquantized model over the calibration
set that records everything the probes replay.

For every batch it keeps each decoder block's input and the reference's
next-token distribution (at every `kl_stride`-th position), and for every
Linear the Gram matrix X^T X of its inputs (grams.py), over the probe
sequences and any Gram-only sequences. A probe then quantizes one layer,
replays the cached input of that layer's block and runs only the blocks from
there to the logits (`ReferencePass.probe`); earlier blocks are stand-ins that
return the cached hidden state, so mlx-lm's own model code (masks, sliding
windows, linear-attention layers) runs unchanged.

A streamed model (stream.py) is passed blocks outer, batches inner: each
block's weights are read from disk once, and its Grams, complete, go to disk
before the next block.
"""

import attrs
import mlx.core as mx
import numpy as np

from . import metrics
from .grams import DiskGrams, grams_tapped, head_gram
from .model_tree import block_list, is_tied, norm_owner, quantizable_layers, start_block
from .standins import Stand, blocks_replaced, positions_only, recording, replaying_from, run_stopped, stop_forward


@attrs.frozen(eq=False)
class ReferencePass:
    """What one reference pass recorded (see reference_pass)."""

    model: object
    blocks: list  # the model's own block list (stand-ins go in and out of it)
    owner: object  # the module holding the blocks and the final norm, or None
    positions: mx.array  # the measured positions of every sequence
    kl_stride: int
    tokens: mx.array
    batches: list
    block_inputs: list  # per batch: every block's input, then the last block's output
    refs: list  # per batch: the reference's distribution at the measured positions
    grams: dict  # {Linear path: X^T X}; empty when the pass is not on the reference itself
    head_gram: object  # X^T X of a tied head's input, or None
    token_counts: np.ndarray  # how often each token id occurs in the calibration
    streamed: object = None  # an optiq.stream.Streamed when the blocks live on disk
    layers: list = attrs.field(factory=list)  # [(path, module)] quantizable, in forward order
    expert_tokens: dict = attrs.field(factory=dict)  # {expert projection path: tokens routed to each expert}

    def logits(self, batch):
        """The model's logits at the measured positions only."""
        with positions_only(self.owner, self.positions):
            return self.model(batch)

    def unloader(self, i: int):
        """After block i runs: nothing, or (streaming) hand its weights back to disk."""
        return None if self.streamed is None else (lambda: self.streamed.unload(i))

    def probe(self, start: int) -> float:
        """Mean KL of the current (perturbed) model against the reference, run from block `start`."""
        kl_sum, count = 0.0, 0
        for inputs, ref, batch in zip(self.block_inputs, self.refs, self.batches):
            stands = replaying_from(list(self.blocks), start, inputs[start] if start > 0 else None)
            if self.streamed is not None:
                stands.update({i: Stand(self.blocks[i], after=self.unloader(i)) for i in range(start, len(self.blocks))})
            with blocks_replaced(self.blocks, stands):
                kl = metrics.token_kl(ref, self.logits(batch))
                kl_sum += float(mx.sum(kl))
                count += kl.size
        return kl_sum / max(count, 1)


def _batches(tokens, batch_size: int) -> list:
    return [mx.array(np.asarray(tokens[i : i + batch_size], dtype=np.int32)) for i in range(0, len(tokens), batch_size)]


def reference_pass(model, tokens, batch_size: int = 8, kl_stride: int = 1, refs=None, streamed=None, gram_tokens=None) -> ReferencePass:
    """Run the reference once over `tokens` ((n, seq_len) int ids).

    refs: the reference's distributions for the same batches, when the model
    run here is not the reference (a plan in place, for refinement); then no
    Grams are recorded. streamed: an optiq.stream.Streamed for a model whose
    blocks live on disk. gram_tokens: further sequences whose layer inputs
    only add to the Grams: GPTQ's Hessian over 1k tokens is rank-deficient
    for a 1536-wide input, and 8k tokens cut uniform 4-bit GPTQ's KL on
    SmolLM2 from 0.29 to 0.21, while the probes stay on the small set."""
    blocks = block_list(model)
    owner = norm_owner(model)
    seq_len = int(np.asarray(tokens).shape[1])
    kl_stride = 1 if owner is None else kl_stride
    positions = mx.arange(kl_stride - 1, seq_len, kl_stride)
    layers = quantizable_layers(model)
    token_array = mx.array(np.asarray(tokens, dtype=np.int32))
    batches = [token_array[i : i + batch_size] for i in range(0, token_array.shape[0], batch_size)]
    gram_batches = [] if gram_tokens is None or refs is not None else _batches(gram_tokens, batch_size)
    shell = ReferencePass(model, blocks, owner, positions, kl_stride, token_array, batches, [], [], {}, None,
                      np.bincount(np.asarray(tokens).reshape(-1), minlength=1), streamed, layers)
    # Grams only on the reference itself (they weight every error estimate).
    grams = (DiskGrams() if streamed is not None else {}) if refs is None else {}
    tapped = layers if refs is None else []
    expert_tokens = {}
    with grams_tapped(model, tapped, grams, expert_tokens) as linear_paths:
        if streamed is not None:
            block_inputs, finals, ref_dists = _streamed_pass(shell, gram_batches, grams, linear_paths, refs)
        else:
            block_inputs, ref_dists = _memory_pass(shell, refs)
            finals = _gram_only_pass(shell, gram_batches)
    tied_gram = None
    if is_tied(model) and refs is None and owner is not None:
        tied_gram = head_gram(owner["norm"], [inputs[-1] for inputs in block_inputs] + finals)
    return attrs.evolve(shell, block_inputs=block_inputs, refs=ref_dists, grams=grams, head_gram=tied_gram, expert_tokens=expert_tokens)


def _memory_pass(ref: ReferencePass, refs):
    """Every block's input and the last block's output per batch, and the
    reference's distributions."""
    block_inputs, dists = [], []
    originals = list(ref.blocks)
    for n, batch in enumerate(ref.batches):
        inputs, last = [], []
        with blocks_replaced(ref.blocks, recording(originals, inputs, last)):
            logits = ref.logits(batch)
            dists.append(refs[n] if refs is not None else metrics.reference_from_logits(logits))
            mx.eval(logits)
        block_inputs.append(inputs + last)
        mx.eval(block_inputs[-1])
    return block_inputs, dists


def _gram_only_pass(ref: ReferencePass, gram_batches) -> list:
    """The Gram-only batches: a forward each with the taps on, stopped after
    the last block (no head), keeping only the last block's output."""
    finals, last = [], len(ref.blocks) - 1
    for batch in gram_batches:
        with blocks_replaced(ref.blocks, {last: Stand(ref.blocks[last], outputs=finals, after=stop_forward)}):
            run_stopped(ref.model, batch)
    return finals


def _streamed_pass(ref: ReferencePass, gram_batches, grams, linear_paths, refs):
    """Blocks outer, batches inner (see the module docstring)."""
    originals = list(ref.blocks)
    n, kept = len(originals), len(ref.batches)
    everything = ref.batches + gram_batches
    hidden = [[] for _ in everything]  # per batch: block inputs, then the last output

    def unload_and_stop(j):
        def after():
            ref.streamed.unload(j)
            stop_forward()
        return after

    for j in range(n):
        for b, batch in enumerate(everything):
            stands = replaying_from(originals, j, hidden[b][j] if j > 0 else None)
            stands[j] = Stand(originals[j], inputs=hidden[b] if j == 0 else None, outputs=hidden[b], after=unload_and_stop(j))
            with blocks_replaced(ref.blocks, stands):
                run_stopped(ref.model, batch)
            if b >= kept and j > 0:  # a Gram-only batch keeps its latest hidden state only
                hidden[b][j] = None
        grams.flush([p for p in linear_paths if start_block(p, n) == j])
    dists = []
    for b, batch in enumerate(ref.batches):
        stands = {i: Stand(originals[i]) for i in range(n - 1)}
        stands[n - 1] = Stand(originals[n - 1], replay=hidden[b][n])
        with blocks_replaced(ref.blocks, stands):
            logits = ref.logits(batch)
            dists.append(refs[b] if refs is not None else metrics.reference_from_logits(logits))
            mx.eval(dists[-1])
    return hidden[:kept], [h[-1] for h in hidden[kept:]], dists
