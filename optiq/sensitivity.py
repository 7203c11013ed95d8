"""Weight sensitivity: KL(reference || model with one layer quantized).

The reference pass runs once: it records every block's input and, for each
Linear, the Gram matrix X^T X of its inputs. A probe quantizes one layer
(quantize, then dequantize, in fp32), replays the cached input of that layer's
block, and runs only the blocks from there to the logits. Earlier blocks are
replaced by stand-ins that return the cached hidden state, so mlx-lm's own
model code (masks, sliding windows, linear-attention layers) runs unchanged.

Probing every candidate of every layer is the exact table. To save time, a
probe can measure only some `anchor` candidates per layer; the rest are
predicted from the layer's weight-space output error tr(dW X^T X dW^T), with
a per-layer power law fitted to the anchors.
"""

import json
import re
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import distributed, metrics
from .errors import OptiqError
from .records import Candidate, LayerSensitivity, SensitivityTable

ROW_SLAB = 1 << 20  # weights per slab of rows (quantizing, probing and estimating large layers)


def fake_quantize(weight: mx.array, candidate: Candidate) -> mx.array:
    """The fp32 weight a layer holds after quantize-then-dequantize."""
    from .rounding import stored_dtype

    if candidate.bits >= 16:
        return weight.astype(stored_dtype()).astype(mx.float32)
    return dequantize_rows(quantize_rows(weight, candidate), candidate)


def quantize_rows(weight: mx.array, candidate: Candidate) -> tuple:
    """MLX's (codes, scales, biases), scales and biases rounded through the
    dtype they are stored in (rounding.stored_as). A slab of rows at a time:
    mx.quantize holds up to six times its input in temporaries at 3, 5 and 6
    bits, and groups run along a row, so slabs give the same codes."""
    from .rounding import stored_dtype

    dtype, parts = stored_dtype(), []
    for rows in row_slabs(weight.shape):
        q, scales, biases = mx.quantize(weight[rows].astype(mx.float32), group_size=candidate.group_size, bits=candidate.bits)
        parts.append((q, scales.astype(dtype).astype(mx.float32), biases.astype(dtype).astype(mx.float32)))
        mx.eval(parts[-1])
    return tuple(mx.concatenate(p) if len(p) > 1 else p[0] for p in zip(*parts))


def row_slabs(shape) -> list:
    """Slices of about ROW_SLAB weights over the rows of a (rows, columns) matrix."""
    rows = max(1, ROW_SLAB // max(1, shape[-1]))
    return [slice(lo, lo + rows) for lo in range(0, shape[0], rows)]


def dequantize_rows(parts: tuple, candidate: Candidate) -> mx.array:
    return mx.dequantize(*parts, group_size=candidate.group_size, bits=candidate.bits)


QUANTIZERS = ("rtn", "gptq")


def gptq_weight(weight: mx.array, gram, candidate: Candidate):
    """(fp32 weight, (codes, scales, biases)) after GPTQ onto MLX's affine grid."""
    from .rounding import dequantize, gptq

    q, scales, biases = gptq(np.array(weight.astype(mx.float32)), np.array(gram), candidate)
    return mx.array(dequantize(q, scales, biases, candidate.group_size)), (q, scales, biases)


# -- finding things inside an mlx-lm model -----------------------------------


def container_of(model: nn.Module, path: str):
    """(container, key) such that container[key] is the module at `path`."""
    node = model
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    return node, (int(last) if isinstance(node, list) else last)


def block_list(model: nn.Module):
    """The list of decoder blocks that the model's forward iterates over."""
    layers = model.layers
    first = layers[0]
    for _, module in model.named_modules():
        owned = module.get("layers") if isinstance(module, dict) else None
        if isinstance(owned, list) and any(x is first for x in owned):
            return owned
    raise OptiqError("cannot find the decoder blocks of this model")


def quantizable_layers(model: nn.Module) -> list:
    """[(path, module)] for every Linear and Embedding, in forward order."""
    out = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and not isinstance(
            module, (nn.QuantizedLinear, nn.QuantizedEmbedding)
        ):
            out.append((path, module))
    return sorted(out, key=lambda pm: _order_key(pm[0]))


_BLOCK = re.compile(r"layers\.(\d+)\.")


def _order_key(path: str):
    m = _BLOCK.search(path)
    if "embed" in path and not m:
        return (-1, path)
    return (int(m.group(1)) if m else 1 << 30, path)


def is_tied(model: nn.Module) -> bool:
    return not any(p.endswith("lm_head") for p, _ in model.named_modules())


def start_block(path: str, n_blocks: int) -> int:
    """The first block whose output a perturbation of `path` changes (n = only the head)."""
    m = _BLOCK.search(path)
    if m:
        return int(m.group(1))
    if path.split(".")[-1] == "lm_head":
        return n_blocks
    return 0  # embeddings and anything before the blocks: the full forward


def candidates_for(module, candidates) -> tuple:
    """The candidates whose group size divides this layer's input dimension."""
    in_dim = module.weight.shape[-1]
    return tuple(c for c in candidates if c.bits >= 16 or in_dim % c.group_size == 0)


# -- stand-ins for blocks ------------------------------------------------------


class _Stand:
    """Stands in a block list: records the block's input (and output), or
    replays a cached output, or (neither) passes its input through."""

    def __init__(self, block, inputs=None, outputs=None, replay=None, after=None):
        self._block, self._inputs, self._outputs, self._replay = block, inputs, outputs, replay
        self._after = after  # streaming: evaluate the output, then give the weights back

    def __getattr__(self, name):  # layer attributes the model reads (use_sliding, is_linear)
        return getattr(self._block, name)

    def __call__(self, x, *args, **kwargs):
        if self._replay is not None:
            return self._replay
        if self._inputs is None and self._after is None:
            return x
        if self._inputs is not None:
            self._inputs.append(x.astype(mx.float32))
        out = self._block(x, *args, **kwargs)
        if self._outputs is not None:
            self._outputs.append(out.astype(mx.float32))
        if self._after is not None:
            mx.eval(out, *(self._outputs or ())[-1:])  # what was just recorded, not the whole list again
            self._after()
        return out


class _StopForward(Exception):
    """Ends a forward pass after the block being measured (streaming)."""


class _DiskGrams(dict):
    """Gram matrices that go to disk once complete; every read of a stored one
    is a fresh lazy load, freed when its reader is done with it."""

    def __init__(self, folder):
        super().__init__()
        self.folder, self.files = Path(folder), {}

    def flush(self, paths):
        for path in paths:
            if dict.__contains__(self, path):
                file = self.folder / f"{len(self.files)}.safetensors"
                mx.save_safetensors(str(file), {"gram": dict.__getitem__(self, path)})
                self.files[path] = file
                dict.__delitem__(self, path)

    def get(self, path, default=None):
        if path in self.files:
            return mx.load(str(self.files[path]))["gram"]
        return dict.get(self, path, default)

    def __getitem__(self, path):
        value = self.get(path)
        if value is None:
            raise KeyError(path)
        return value

    def __contains__(self, path):
        return path in self.files or dict.__contains__(self, path)


class _Positions:
    """Stands in for the final norm: keeps only the positions whose KL is measured,
    so the head (the largest matmul and softmax of a small model) runs on those
    alone. Every position still sees its full causal context."""

    def __init__(self, norm, positions):
        self._norm, self._positions = norm, positions

    def __call__(self, h):
        return self._norm(h)[:, self._positions]


def norm_owner(model):
    """The module holding the blocks and the final norm (None if there is none)."""
    return next((m for _, m in model.named_modules() if "norm" in m and "layers" in m), None)


@contextmanager
def positions_only(owner, positions):
    """Inside, the logits of the model whose norm_owner is `owner` come out at
    `positions` only (see _Positions)."""
    if owner is None or positions is None:
        yield
        return
    norm = owner["norm"]
    owner["norm"] = _Positions(norm, positions)
    try:
        yield
    finally:
        owner["norm"] = norm


class _Tap(nn.Module):
    """Wraps a Linear during the reference pass to accumulate X^T X of its input."""

    def __init__(self, inner, grams, path):
        super().__init__()
        self.inner = inner
        self._grams, self._path = grams, path

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        gram = flat.T @ flat
        self._grams[self._path] = self._grams.get(self._path, 0) + gram
        mx.eval(self._grams[self._path])
        return self.inner(x)


class _SlabbedCodes:
    """A probe's quantized copy of a large resident layer (a 49k-row tied
    embedding) that never exists whole in fp32: a lookup dequantizes the rows
    it takes, a product dequantizes a slab of rows at a time. Streaming only;
    in memory the probe holds fake_quantize's full copy."""

    def __init__(self, inner, codes, candidate):
        self._inner, self._codes, self._candidate = inner, codes, candidate

    def __getattr__(self, name):  # attributes the model reads (e.g. bias)
        return getattr(self._inner, name)

    def __call__(self, x):
        if isinstance(self._inner, nn.Embedding):
            return dequantize_rows(tuple(p[x] for p in self._codes), self._candidate)
        y = self.as_linear(x)
        return y + self._inner.bias if "bias" in self._inner else y

    def as_linear(self, x):
        outs = []
        for rows in row_slabs((self._codes[0].shape[0], x.shape[-1])):
            w = dequantize_rows(tuple(p[rows] for p in self._codes), self._candidate)
            outs.append(x @ w.T)
        return mx.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]


# -- the reference pass -------------------------------------------------------


class Calibrated:
    """Everything the probes need, from one reference pass over the calibration set."""

    def __init__(self, model, tokens, batch_size: int, kl_stride: int = 1, refs=None, quantizer: str = "rtn", streamed=None, gram_tokens=None):
        """refs: the reference's view of the same batches, when the model being
        cached is not the reference (a plan in place, for refinement).
        streamed: an optiq.stream.Streamed when the blocks live on disk.
        gram_tokens: further sequences whose layer inputs only add to the
        Gram matrices. GPTQ's Hessian over 1k tokens is rank-deficient for a
        1536-wide input; 8k tokens cut uniform 4-bit GPTQ's KL on SmolLM2
        from 0.29 to 0.21, while the probes stay on the small set."""
        self.model = model
        self.streamed = streamed
        self.quantizer = quantizer
        self.blocks = block_list(model)
        self.owner = norm_owner(model)
        seq_len = int(np.asarray(tokens).shape[1])
        if self.owner is None:
            kl_stride = 1
        self.kl_stride = kl_stride
        self.positions = mx.arange(kl_stride - 1, seq_len, kl_stride)
        self.layers = quantizable_layers(model)
        self.tokens = mx.array(np.asarray(tokens, dtype=np.int32))
        self.batches = [
            self.tokens[i : i + batch_size] for i in range(0, self.tokens.shape[0], batch_size)
        ]
        self.gram_batches = [] if gram_tokens is None or refs is not None else [
            mx.array(np.asarray(gram_tokens[i : i + batch_size], dtype=np.int32))
            for i in range(0, len(gram_tokens), batch_size)
        ]
        self.block_inputs, self.refs, self.grams, self._errors = [], [], {}, {}
        self.token_counts = np.bincount(
            np.asarray(tokens).reshape(-1), minlength=1
        )
        self._reference_pass(refs)

    def _reference_pass(self, refs=None):
        # Gram matrices only on the reference itself (they predict unprobed candidates).
        linears = [(p, m) for p, m in self.layers if isinstance(m, nn.Linear)] if refs is None else []
        for path, module in linears:
            container, key = container_of(self.model, path)
            container[key] = _Tap(module, self.grams, path)
        try:
            if self.streamed is not None:
                self._streamed_reference_pass(refs, [p for p, _ in linears])
            else:
                self._memory_reference_pass(refs)
                self._memory_gram_pass()
        finally:
            for path, module in linears:
                container, key = container_of(self.model, path)
                container[key] = module
        if is_tied(self.model) and refs is None:
            self._head_gram([inputs[-1] for inputs in self.block_inputs] + self._gram_finals)
        self._gram_finals = []

    def _memory_reference_pass(self, refs):
        originals = list(self.blocks)
        try:
            for n, batch in enumerate(self.batches):
                inputs, last = [], []
                for i, block in enumerate(originals):
                    outputs = last if i == len(originals) - 1 else None
                    self.blocks[i] = _Stand(block, inputs=inputs, outputs=outputs)
                logits = self.logits(batch)
                self.refs.append(refs[n] if refs is not None else metrics.reference_from_logits(logits))
                mx.eval(logits)
                self.block_inputs.append(inputs + last)
                mx.eval(self.block_inputs[-1])
                self.blocks[:] = originals
        finally:
            self.blocks[:] = originals

    def _memory_gram_pass(self):
        """The Gram-only batches: a forward each with the taps on, stopped
        after the last block (no head), keeping only the last block's output."""
        originals, last = list(self.blocks), len(self.blocks) - 1
        self._gram_finals = []

        def stop():
            raise _StopForward

        try:
            for batch in self.gram_batches:
                self.blocks[last] = _Stand(originals[last], outputs=self._gram_finals, after=stop)
                try:
                    self.model(batch)
                except _StopForward:
                    pass
        finally:
            self.blocks[:] = originals

    def _streamed_reference_pass(self, refs, linear_paths):
        """Blocks outer, batches inner: each block's weights are read from disk
        once, and its Gram matrices, complete, go to disk before the next block."""
        import tempfile

        self._gram_folder = tempfile.TemporaryDirectory(prefix="optiq-grams-")
        self.grams = _DiskGrams(self._gram_folder.name)
        for path in linear_paths:  # the taps hold the dict they add into
            container, key = container_of(self.model, path)
            container[key]._grams = self.grams
        originals = list(self.blocks)
        hidden = [[] for _ in self.batches]  # per batch: block inputs, then the last output

        def stop(j):
            def after():
                self.streamed.unload(j)
                raise _StopForward
            return after

        try:
            self._stream_blocks(originals, hidden, linear_paths, stop, refs)
        finally:
            self.blocks[:] = originals
        self.block_inputs = hidden[: len(self.batches)]
        self._gram_finals = [h[-1] for h in hidden[len(self.batches) :]]

    def _stream_blocks(self, originals, hidden, linear_paths, stop, refs):
        n, kept = len(originals), len(self.batches)
        hidden += [[] for _ in self.gram_batches]
        for j in range(n):
            for b, batch in enumerate(self.batches + self.gram_batches):
                self.blocks[:] = originals
                for i in range(j - 1):
                    self.blocks[i] = _Stand(originals[i])
                if j > 0:
                    self.blocks[j - 1] = _Stand(originals[j - 1], replay=hidden[b][j])
                self.blocks[j] = _Stand(originals[j], inputs=hidden[b] if j == 0 else None, outputs=hidden[b], after=stop(j))
                try:
                    self.model(batch)
                except _StopForward:
                    pass
                if b >= kept and j > 0:  # a Gram-only batch keeps its latest hidden state only
                    hidden[b][j] = None
            self.grams.flush([p for p in linear_paths if start_block(p, n) == j])
        self.blocks[:] = originals
        for b, batch in enumerate(self.batches):
            for i in range(n - 1):
                self.blocks[i] = _Stand(originals[i])
            self.blocks[n - 1] = _Stand(originals[n - 1], replay=hidden[b][n])
            logits = self.logits(batch)
            self.refs.append(refs[b] if refs is not None else metrics.reference_from_logits(logits))
            mx.eval(self.refs[-1])
            self.blocks[:] = originals

    def _head_gram(self, finals):
        """X^T X of the tied head's input: the final norm of the last block's output."""
        if self.owner is None:
            return
        total = 0
        for final in finals:
            x = self.owner["norm"](final).astype(mx.float32)
            flat = x.reshape(-1, x.shape[-1])
            total = total + flat.T @ flat
        mx.eval(total)
        self.head_gram = total

    # -- probes ----------------------------------------------------------------

    def logits(self, batch):
        """The model's logits at the measured positions only."""
        with positions_only(self.owner, self.positions):
            return self.model(batch)

    def unloader(self, i: int):
        """After block i runs: nothing, or (streaming) hand its weights back to disk."""
        return None if self.streamed is None else (lambda: self.streamed.unload(i))

    def probe(self, start: int) -> float:
        """Mean KL of the current (perturbed) model, run from block `start`."""
        originals = list(self.blocks)
        kl_sum, count = 0.0, 0
        try:
            for inputs, ref, batch in zip(self.block_inputs, self.refs, self.batches):
                if start > 0:
                    for i in range(start - 1):
                        self.blocks[i] = _Stand(originals[i])
                    self.blocks[start - 1] = _Stand(originals[start - 1], replay=inputs[start])
                if self.streamed is not None:
                    for i in range(start, len(originals)):
                        self.blocks[i] = _Stand(originals[i], after=self.unloader(i))
                kl = metrics.token_kl(ref, self.logits(batch))
                kl_sum += float(mx.sum(kl))
                count += kl.size
                self.blocks[:] = originals
        finally:
            self.blocks[:] = originals
        return kl_sum / max(count, 1)

    def gram_for(self, path: str, module):
        """X^T X of the layer's input, when one was recorded."""
        if isinstance(module, nn.Linear):
            return self.grams.get(path)
        return getattr(self, "head_gram", None)  # a tied embedding's head role

    def uses_gptq(self, path: str, module, candidate: Candidate) -> bool:
        """GPTQ where this pass uses it and an input Gram matrix exists; else MLX's rounding."""
        return self.quantizer == "gptq" and candidate.bits < 16 and self.gram_for(path, module) is not None

    def quantized(self, path: str, module, weight: mx.array, candidate: Candidate) -> mx.array:
        """The fp32 weight this layer holds at `candidate`, with this pass's quantizer."""
        if self.uses_gptq(path, module, candidate):
            return gptq_weight(weight, self.gram_for(path, module), candidate)[0]
        return fake_quantize(weight, candidate)

    def codes(self, path: str, module, weight: mx.array, candidate: Candidate):
        """(codes, scales, biases) to write, or None where mlx-lm's own rounding is used."""
        if self.uses_gptq(path, module, candidate):
            return gptq_weight(weight, self.gram_for(path, module), candidate)[1]
        return None

    def output_error(self, path: str, module, candidate: Candidate) -> float:
        """Weight-space output error tr(dW G dW^T) summed over calibration tokens.
        Rows are independent (groups run along a row), so a large layer (a
        49k-row embedding) is taken a slab of rows at a time: a few MB live
        instead of several fp32 copies of the whole matrix."""
        known = self._errors.pop((path, candidate), None)
        if known is not None:
            return known
        weighting = self._weighting(path, module)  # once: a streamed Gram is a read from disk
        mx.eval(module.weight)  # once, not once per slab (a streamed weight is a lazy read)
        total = 0.0
        for rows in row_slabs(module.weight.shape):
            w = module.weight[rows].astype(mx.float32)
            total += _weighted_error(self.quantized(path, module, w, candidate) - w, rows, *weighting)
        return total

    def remember_error(self, path: str, module, candidate: Candidate, dw: mx.array):
        """A probe's whole-layer error, kept for the table (GPTQ is the slow part)."""
        self._errors[(path, candidate)] = _weighted_error(dw, slice(None), *self._weighting(path, module))

    def _weighting(self, path: str, module):
        """(Gram of the layer's input, or None; per-row token counts for an
        embedding's lookups, or None)."""
        gram = self.grams.get(path) if isinstance(module, nn.Linear) else getattr(self, "head_gram", None)
        if gram is not None or isinstance(module, nn.Linear):
            return gram, None
        counts = np.zeros(module.weight.shape[0], dtype=np.float32)
        k = min(len(self.token_counts), len(counts))
        counts[:k] = self.token_counts[:k]
        return None, counts


def _weighted_error(dw: mx.array, rows, gram, counts) -> float:
    """tr(dW G dW^T) for these rows; lookups weigh rows by token counts; else plain squares."""
    if gram is not None:
        return float(mx.sum((dw @ gram) * dw))
    if counts is not None:
        return float(mx.sum(mx.sum(dw * dw, axis=1) * mx.array(counts[rows])))
    return float(mx.sum(dw * dw))


def _proxy_table(cal, plan, model_id, reference, cal_digest, n_tokens, tied) -> SensitivityTable:
    """The fast estimator: KL proportional to each layer's weight-space output
    error, with one global scale set by a single whole-model probe (every layer
    at its middle candidate). No per-layer probes."""
    errors = {path: [cal.output_error(path, module, c) for c in cands] for path, module, cands, _ in plan}
    middle = [(path, module, len(cands) // 2, cands) for path, module, cands, _ in plan if cands]
    saved = []
    for path, module, i, cands in middle:
        saved.append((module, module.weight))
        module.weight = cal.quantized(path, module, module.weight, cands[i])
    try:
        whole = cal.probe(0)
    finally:
        for module, weight in saved:
            module.weight = weight
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
            reference=reference,
            roles=("embedding", "lm_head") if tied and isinstance(module, nn.Embedding) else (),
        )
        for path, module, cands, _ in plan
    )
    return SensitivityTable(model=model_id, layers=layers, calibration_digest=cal_digest, n_tokens=n_tokens, reference=reference, method="proxy: output error x one global scale")


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


# -- the on-disk probe cache ---------------------------------------------------


class ProbeCache:
    """Probe results on disk, one JSON line each, so an interrupted pass resumes."""

    def __init__(self, path):
        self.path = Path(path) if path else None
        self.values = {}
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.values[(row["path"], row["candidate"])] = float(row["kl"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by an interruption

    def get(self, path, candidate):
        return self.values.get((path, candidate.key))

    def put(self, path, candidate, kl):
        self.values[(path, candidate.key)] = kl
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"path": path, "candidate": candidate.key, "kl": kl}) + "\n")


# -- the stage -------------------------------------------------------------------


def _quantize_in_place(model, cal, path: str, module, c: Candidate):
    """Layer `path` at candidate `c` for a probe; returns what puts it back.
    Streaming, a resident layer (a 49k-row embedding) goes back to disk once
    its codes are made and the probe runs on the codes (_SlabbedCodes), so
    it is never held twice; it is read again when next used."""
    original = module.weight
    container, key = container_of(model, path)
    on_disk = cal.streamed.lazy_weight(path) if cal.streamed is not None and not _BLOCK.search(path) else None
    if on_disk is not None and c.bits < 16 and not cal.uses_gptq(path, module, c):
        container[key] = _SlabbedCodes(module, quantize_rows(original, c), c)
        module.weight = original = on_disk  # the evaluated original goes
    else:
        module.weight = cal.quantized(path, module, original, c)
        if cal.uses_gptq(path, module, c):
            cal.remember_error(path, module, c, module.weight - original)

    def restore():
        container[key] = module
        module.weight = original

    return restore


def measure_weights(
    model,
    tokens,
    candidates,
    anchors=None,
    model_id: str = "",
    reference: str = "fp32",
    batch_size: int = 8,
    kl_stride: int = 4,
    cache_path=None,
    progress: bool = True,
    calibrated=None,
    quantizer: str = "rtn",
    streamed=None,
) -> SensitivityTable:
    """The sensitivity table of `model` on calibration `tokens`.

    anchors: None probes every candidate; otherwise a set of bit-widths to probe,
    the other candidates predicted from weight-space error.
    """
    from tqdm.auto import tqdm

    from .calibration import digest

    candidates = tuple(sorted(set(candidates), key=lambda c: (c.bits, c.group_size)))
    cal = calibrated or Calibrated(model, tokens, batch_size, kl_stride, quantizer=quantizer, streamed=streamed)
    streamed = cal.streamed

    def release(path):  # streaming: the probed layer's weights back to disk
        if streamed is not None and _BLOCK.search(path):
            streamed.unload(start_block(path, n_blocks))

    cache = ProbeCache(cache_path if distributed.is_writer() else None)  # one writer under mlx.launch
    n_blocks = len(cal.blocks)
    tied = is_tied(model)
    proxy = anchors is not None and len(anchors) == 0
    plan = []
    for path, module in cal.layers:
        cands = candidates_for(module, candidates)
        todo = [c for c in cands if anchors is None or c.bits in anchors]
        if cands and not todo and not proxy:  # no anchor fits this layer: probe the middle candidate
            todo = [cands[len(cands) // 2]]
        plan.append((path, module, cands, todo))
    if proxy:
        return _proxy_table(cal, plan, model_id, reference, digest(tokens), int(np.asarray(tokens).size), tied)
    n_probes = sum(len(t) for *_, t in plan)
    bar = tqdm(total=n_probes, desc="sensitivity", unit="probe", disable=not progress or not distributed.is_writer())
    cal_digest = digest(tokens)
    probes = [(path, c) for path, _, _, todo in plan for c in todo]
    modules = {path: module for path, module, _, _ in plan}
    probed = {}
    for n, (path, c) in enumerate(probes):
        bar.update(1)
        if not distributed.mine(n):  # another rank's probe (mlx.launch)
            continue
        kl = cache.get(path, c)
        if kl is None:
            restore = _quantize_in_place(model, cal, path, modules[path], c)
            try:
                kl = cal.probe(start_block(path, n_blocks))
            finally:
                restore()
                release(path)
            cache.put(path, c, kl)
        probed[(path, c)] = kl
    bar.close()
    if distributed.group().size() > 1:
        probed = distributed.gather(probed, probes)
        for (path, c), kl in probed.items():
            if cache.get(path, c) is None:
                cache.put(path, c, kl)
    layers = []
    for path, module, cands, todo in plan:
        errors = [cal.output_error(path, module, c) for c in cands]
        release(path)
        measured = {c: probed[(path, c)] for c in todo}
        idx = [cands.index(c) for c in todo]
        predicted = predict_kl(errors, [errors[i] for i in idx], [measured[c] for c in todo])
        kls = [measured.get(c, float(p)) for c, p in zip(cands, predicted)]
        roles = ("embedding", "lm_head") if tied and isinstance(module, nn.Embedding) else ()
        layers.append(
            LayerSensitivity(
                path=path,
                n_params=int(module.weight.size),
                candidates=cands,
                kl=kls,
                measured=[c in measured for c in cands],
                error=errors,
                calibration_digest=cal_digest,
                reference=reference,
                roles=roles,
            )
        )
    return SensitivityTable(
        model=model_id,
        layers=tuple(layers),
        calibration_digest=cal_digest,
        n_tokens=int(np.asarray(tokens).size),
        reference=reference,
        method=("probe" if anchors is None else f"probe anchors {sorted(anchors)} + predicted") + f", {cal.quantizer}",
    )
