"""Multimodal checkpoints -> text-only models.

Detection is by config and weight names through one table: a new family is
one `Family` entry. The text config becomes the top-level config under the
text model type mlx-lm loads (gemma3_text, qwen3, ...), weight names lose
their multimodal prefixes, vision/audio towers and projectors are dropped,
and the tokenizer and chat template are kept.
"""

import json
import shutil
from pathlib import Path

import attrs
import mlx.core as mx
from mlx_lm.utils import make_shards
from safetensors import safe_open

from .errors import OptiqError
from .io import atomic_output, write_json
from .source import cache_dir, folder_digest

MODALITY_CONFIG_KEYS = ("vision_config", "audio_config", "vision_tower_config")
# Files that only the vision/audio processors read.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


@attrs.frozen
class Family:
    name: str
    model_types: tuple
    text_model_type: str | None  # None: keep the text config's own model_type
    text_prefixes: tuple  # ((source prefix, text prefix), ...): first match wins
    drop_prefixes: tuple
    # Values mlx-lm's multimodal wrapper forces on its text model, kept so that
    # the text-only model computes the same logits.
    defaults: tuple = ()
    top_level_overrides: tuple = ()


_LM = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."), ("model.language_model.", "model."), ("lm_head.", "lm_head."))

_QWEN_VL_LM = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."), ("model.", "model."), ("lm_head.", "lm_head."))

FAMILIES = (
    Family(
        "gemma3",
        ("gemma3",),
        "gemma3_text",
        _LM,
        ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
        defaults=(("num_attention_heads", 8), ("num_key_value_heads", 4), ("vocab_size", 262208)),
        top_level_overrides=("vocab_size",),
    ),
    Family(
        "gemma3n",
        ("gemma3n",),
        "gemma3n",  # mlx-lm has no separate text type: keep the wrapper, text weights only
        (("model.language_model.", "model.language_model."), ("lm_head.", "lm_head.")),
        ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio."),
    ),
    # Hugging Face names (model.language_model., visual.) and mlx-vlm's (language_model.model., vision_tower.)
    Family("qwen2-vl", ("qwen2_vl", "qwen2_5_vl"), "qwen2", _QWEN_VL_LM, ("visual.", "model.visual.", "vision_tower.")),
    Family("qwen3-vl", ("qwen3_vl",), "qwen3", _QWEN_VL_LM, ("visual.", "model.visual.", "vision_tower.")),
    Family("qwen3.5", ("qwen3_5",), "qwen3_5", (("model.language_model.", "model."), ("language_model.model.", "model."), ("mtp.", "mtp."), ("lm_head.", "lm_head.")), ("model.visual.", "vision_tower.", "visual.")),
    Family("llama4", ("llama4",), "llama4_text", _LM, ("vision_model.", "multi_modal_projector.")),
    Family(
        "mistral3",
        ("mistral3", "llava"),
        None,
        _LM,
        ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
    ),
)


@attrs.frozen
class StripReport:
    family: str
    source_model_type: str
    text_model_type: str
    removed_tensors: int
    removed_bytes: int
    kept_bytes: int
    removed_config_keys: tuple = attrs.field(converter=tuple)
    removed_prefixes: tuple = attrs.field(converter=tuple)

    def to_dict(self) -> dict:
        d = attrs.asdict(self)
        d["removed_config_keys"] = list(self.removed_config_keys)
        d["removed_prefixes"] = list(self.removed_prefixes)
        return d


def family_of(config: dict):
    for family in FAMILIES:
        if config.get("model_type") in family.model_types:
            return family
    return None


def weight_names(folder: Path) -> dict:
    """{tensor name: (file, nbytes)} read from safetensors headers only."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                size = 1
                for d in shape:
                    size *= d
                out[name] = (f, size * _DTYPE_BYTES.get(dtype, 2))
    return out


_DTYPE_BYTES = {"F64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def is_multimodal(folder: Path) -> bool:
    """True when the folder holds vision/audio parts that a text model does not use.

    Raises for a layout that looks multimodal but is not in the table."""
    config = json.loads((Path(folder) / "config.json").read_text())
    family = family_of(config)
    has_modality_config = any(k in config for k in MODALITY_CONFIG_KEYS)
    if family is None:
        if has_modality_config:
            raise OptiqError(
                f"unrecognised multimodal layout: model_type {config.get('model_type')!r} with "
                f"{[k for k in MODALITY_CONFIG_KEYS if k in config]}; known families: "
                + ", ".join(f.name for f in FAMILIES)
            )
        return False
    names = weight_names(folder)
    return has_modality_config or any(n.startswith(family.drop_prefixes) for n in names)


def text_name(name: str, family: Family):
    """The text-model name of a weight, None to drop it; raises when unrecognised."""
    if name.startswith(family.drop_prefixes):
        return None
    for source, target in family.text_prefixes:
        if name.startswith(source):
            return target + name[len(source) :]
    raise OptiqError(f"unrecognised weight {name!r} in a {family.name} checkpoint")


def text_config(config: dict, family: Family) -> tuple:
    """(text-only config, removed top-level keys)."""
    if "text_config" in config:
        text = dict(config["text_config"])
        for key in family.top_level_overrides:
            if key in config:
                text[key] = config[key]
        for key in ("eos_token_id", "bos_token_id", "pad_token_id", "torch_dtype", "tie_word_embeddings"):
            if key in config and key not in text:
                text[key] = config[key]
        removed = [k for k in config if k not in text and k != "text_config"]
    else:
        text = {k: v for k, v in config.items() if k not in MODALITY_CONFIG_KEYS}
        removed = [k for k in config if k in MODALITY_CONFIG_KEYS]
    for key, value in family.defaults:
        text.setdefault(key, value)
    if family.text_model_type == family.model_types[0] and "text_config" in config:
        # A family without a separate text type keeps its wrapper config.
        text = {k: v for k, v in config.items() if k not in MODALITY_CONFIG_KEYS}
        removed = [k for k in config if k in MODALITY_CONFIG_KEYS]
    else:
        text["model_type"] = family.text_model_type or text.get("model_type")
        text.pop("architectures", None)
    return text, sorted(removed)


def strip(src, out, force: bool = False) -> StripReport:
    """Write the text-only model of multimodal checkpoint `src` into `out`, atomically."""
    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    family = family_of(config)
    if family is None or not is_multimodal(src):
        raise OptiqError(f"{src} is not a multimodal checkpoint of a known family")
    names = weight_names(src)
    kept, removed_bytes, removed, removed_prefixes = {}, 0, 0, set()
    for name, (_, nbytes) in names.items():
        target = text_name(name, family)
        if target is None:
            removed += 1
            removed_bytes += nbytes
            removed_prefixes.add(next(p for p in family.drop_prefixes if name.startswith(p)))
        else:
            kept[name] = target
    new_config, removed_keys = text_config(config, family)
    with atomic_output(out, force=force) as tmp:
        weights = {}
        for f in sorted(src.glob("*.safetensors")):
            for name, value in mx.load(str(f)).items():
                if name in kept:
                    weights[kept[name]] = value
        shards = make_shards(weights)
        fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        for i, shard in enumerate(shards):
            mx.save_safetensors(str(tmp / fmt.format(i + 1, len(shards))), shard, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2))
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")) and f.name not in ("config.json", "optiq_metadata.json", *PROCESSOR_FILES):
                shutil.copy(f, tmp / f.name)
        report = StripReport(
            family=family.name,
            source_model_type=config.get("model_type"),
            text_model_type=new_config["model_type"],
            removed_tensors=removed,
            removed_bytes=removed_bytes,
            kept_bytes=sum(names[n][1] for n in kept),
            removed_config_keys=removed_keys,
            removed_prefixes=sorted(removed_prefixes),
        )
        write_json(tmp / "optiq_metadata.json", {"stripped": report.to_dict()})
    return report


def unused_weights(src) -> dict:
    """The vision/audio tensors of a multimodal checkpoint, under their own names."""
    src = Path(src)
    family = family_of(json.loads((src / "config.json").read_text()))
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, value in mx.load(str(f)).items():
            if name.startswith(family.drop_prefixes):
                out[name] = value
    return out


def strip_cached(src) -> tuple:
    """(text-only folder, report): stripped once into the optiq cache."""
    out = cache_dir() / "stripped" / f"{Path(src).name}-{folder_digest(src)}"
    meta = out / "optiq_metadata.json"
    if meta.exists():
        d = json.loads(meta.read_text())["stripped"]
        return out, StripReport(**d)
    return out, strip(src, out, force=True)
