"""Apply a BitPlan and write a folder that stock `mlx_lm.load` opens.

Quantization itself is mlx-lm's `quantize_model` with a per-layer predicate,
so config.json carries mlx-lm's own per-layer `quantization` entries and the
loader needs no optiq code.
"""

import glob
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import quantize_model, save_config, save_model

from .io import atomic_output, write_json
from .model_tree import module_at
from .records import BitPlan
from .rounding import DTYPES, pack


def output_dtype(config: dict, override=None) -> str:
    """The dtype a written model stores scales, biases and float layers in
    (and so what every simulated quantization rounds through): the override
    (--dtype), else bf16 for a bf16 model, else fp16."""
    return override or ("bfloat16" if config.get("torch_dtype") == "bfloat16" else "float16")


def plan_predicate(plan: BitPlan):
    """mlx-lm's quant_predicate for a plan: a dict per planned layer, else keep float."""
    chosen = plan.as_dict()

    def predicate(path, module):
        c = chosen.get(path)
        if c is None or c.bits >= 16:
            return False
        return {"group_size": c.group_size, "bits": c.bits, "mode": c.mode}

    return predicate


def plan_quantization(plan: BitPlan) -> dict:
    """The `quantization` entry mlx-lm's quantize_model writes for `plan`
    (the smallest group size as the default, a dict per quantized layer; a
    float layer has no entry), without a model: what a plan's config says."""
    quantized = [(path, c) for path, c in plan.assignments if c.bits < 16]
    group = min((c.group_size for _, c in quantized), default=64)
    return {"group_size": group, "bits": 4, "mode": "affine",
            **{path: {"group_size": c.group_size, "bits": c.bits, "mode": c.mode} for path, c in quantized}}


def cast_floats(model: nn.Module, dtype) -> nn.Module:
    model.update(
        tree_map(
            lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x,
            model.parameters(),
        )
    )
    return model


def quantize(model: nn.Module, config: dict, plan: BitPlan, dtype="float16", codes=None):
    """(quantized model, config) for `plan`; `model` is consumed (cast in place).

    codes: {path: (integer codes, scales, biases)} from an error-compensating
    quantizer (GPTQ); those layers get exactly these values, packed in MLX's
    own bit order, instead of mlx-lm's round-to-nearest."""
    # mlx-lm skips layers whose width its default group size does not divide,
    # so give it the smallest group size the plan uses.
    group = plan_quantization(plan)["group_size"]
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = dtype
    model, config = quantize_model(
        model, config, group_size=group, bits=4, quant_predicate=plan_predicate(plan)
    )
    apply_codes(model, plan, codes)
    # Cast after quantizing: codes rounded from the fp32 weights, as the
    # sensitivity probes rounded them (rounding fp16 weights in fp16 moves
    # some codes a step), then scales and biases stored in the output dtype.
    return cast_floats(model, DTYPES[dtype]), config


def apply_codes(model: nn.Module, plan: BitPlan, codes) -> nn.Module:
    """Quantized layers given exactly `codes` ({path: (integer codes, scales,
    biases)}, e.g. GPTQ's), packed in MLX's own bit order."""
    chosen = plan.as_dict()
    for path, (q, scales, biases) in (codes or {}).items():
        module = module_at(model, path)
        module.weight = mx.array(pack(q, chosen[path].bits))
        module.scales = mx.array(scales)
        if biases is not None:  # a microscaling format has none
            module.biases = mx.array(biases)
    return model


def model_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def save_model_folder(out, model, tokenizer, config, source_path, metadata: dict, force=False, extra_weights=None, max_shard_bytes=None):
    """Write an mlx-lm model folder atomically, with optiq_metadata.json beside it.

    extra_weights: tensors kept as they are (e.g. a vision tower kept with
    --keep-unused-modalities) in model-unused-modalities.safetensors.
    max_shard_bytes: smaller shards than mlx-lm's 5 GB, for a model whose
    weights are still lazy loads (streaming): each shard is computed, written
    and freed before the next."""
    with atomic_output(out, force=force) as tmp:
        if max_shard_bytes:
            write_shards(tmp, model, max_shard_bytes)
        else:
            save_model(tmp, model)
        save_config(dict(config), config_path=tmp / "config.json", keep_vision_config=bool(extra_weights))
        if extra_weights:
            mx.save_safetensors(str(tmp / "model-unused-modalities.safetensors"), extra_weights, metadata={"format": "mlx"})
        tokenizer.save_pretrained(str(tmp))
        for pattern in ("*.py", "generation_config.json", "chat_template.jinja"):
            for file in glob.glob(str(Path(source_path) / pattern)):
                if not (tmp / Path(file).name).exists():
                    shutil.copy(file, tmp)
        write_json(tmp / "optiq_metadata.json", metadata)
    return Path(out)


def write_shards(folder, model, max_shard_bytes: int):
    """mlx-lm's sharded layout (model-0000i-of-0000n.safetensors and its index),
    one shard evaluated at a time."""
    weights = dict(tree_flatten(model.parameters()))
    total = sum(v.nbytes for v in weights.values())
    shards, size = [{}], 0  # mlx-lm's make_shards counts whole GB; this needs finer
    for k, v in weights.items():
        if size + v.nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    del weights
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for i, name in enumerate(names):
        shard, shards[i] = shards[i], None
        mx.save_safetensors(str(Path(folder) / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
        del shard
        mx.clear_cache()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
