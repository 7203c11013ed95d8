"""LoRA adapter files as weights: read PEFT or mlx-lm adapter folders, fetch
them from the Hub, and mount several on one shared base model.

Both formats reduce to one shape per module, mlx-lm's: `a` (in, r), `b`
(r, out) and `scale`, so that y = base(x) + scale * (x @ a) @ b. PEFT stores
`lora_A.weight` (r, in) and `lora_B.weight` (out, r) with scale alpha / r
(per module through `rank_pattern`/`alpha_pattern`). Only safetensors files are
ever read: a pickled `adapter_model.bin` is refused, never unpickled.
"""

import json
import re
from pathlib import Path

import attrs
import mlx.core as mx
import mlx.nn as nn
import huggingface_hub

from ..errors import OptiqError
from ..source import REPO_ID

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
MLX_WEIGHTS = "adapters.safetensors"
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


@attrs.frozen
class LoRAWeights:
    """One adapter: module path -> (a, b, scale), and where it came from."""

    modules: dict
    base_model: str | None = None
    source: str = ""

    @property
    def ranks(self) -> dict:
        return {path: a.shape[1] for path, (a, _, _) in self.modules.items()}


def _pattern_value(patterns: dict, path: str, default):
    # PEFT matches rank_pattern keys as a suffix or regex of the module name.
    for key, value in (patterns or {}).items():
        if path == key or path.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", path):
            return value
    return default


def _read_safetensors(path: Path) -> dict:
    try:
        return mx.load(str(path))
    except Exception as exc:  # a truncated or foreign file
        raise OptiqError(f"cannot read adapter weights {path}: {exc}")


def read_peft(folder: Path) -> LoRAWeights:
    config = json.loads((folder / PEFT_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise OptiqError(f"{folder}: peft_type {config.get('peft_type')!r} is not LORA")
    pairs = {}
    for key, value in _read_safetensors(folder / PEFT_WEIGHTS).items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise OptiqError(f"{folder}: unexpected tensor {key!r} in {PEFT_WEIGHTS}")
        pairs.setdefault(match.group(1), {})[match.group(2)] = value
    modules = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise OptiqError(f"{folder}: module {path} lacks lora_A or lora_B")
        r = _pattern_value(config.get("rank_pattern"), path, config.get("r", ab["A"].shape[0]))
        alpha = _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", r))
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise OptiqError(f"{folder}: module {path} has rank {ab['A'].shape[0]}, config says {r}")
        modules[path] = (ab["A"].T, ab["B"].T, float(alpha) / r)
    return LoRAWeights(modules, config.get("base_model_name_or_path"), str(folder))


def read_mlx(folder: Path) -> LoRAWeights:
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("fine_tune_type", "lora") != "lora":
        raise OptiqError(f"{folder}: fine_tune_type {config.get('fine_tune_type')!r} is not lora")
    scale = float(config.get("lora_parameters", {}).get("scale", 20.0))
    pairs = {}
    for key, value in _read_safetensors(folder / MLX_WEIGHTS).items():
        path, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise OptiqError(f"{folder}: unexpected tensor {key!r} in {MLX_WEIGHTS}")
        pairs.setdefault(path, {})[leaf] = value
    return LoRAWeights(
        {p: (ab["lora_a"], ab["lora_b"], scale) for p, ab in pairs.items()},
        config.get("model"),
        str(folder),
    )


def read_adapter(folder) -> LoRAWeights:
    """A PEFT or mlx-lm adapter folder, whichever it holds (PEFT first)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OptiqError(f"adapter {folder} is not a folder")
    try:
        if (folder / PEFT_WEIGHTS).exists() and (folder / PEFT_CONFIG).exists():
            return read_peft(folder)
        if (folder / MLX_WEIGHTS).exists() and (folder / "adapter_config.json").exists():
            return read_mlx(folder)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise OptiqError(f"adapter {folder}: malformed config ({exc})")
    if (folder / "adapter_model.bin").exists():
        raise OptiqError(f"adapter {folder} has only adapter_model.bin (pickle); optiq reads safetensors only")
    raise OptiqError(f"adapter {folder} has neither {PEFT_WEIGHTS} nor {MLX_WEIGHTS} with adapter_config.json")


def resolve_adapter(source: str) -> Path:
    """A local folder, or a Hugging Face repo id downloaded (config and safetensors only)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not REPO_ID.match(source):
        raise OptiqError(f"adapter {source!r} is neither a folder nor a Hugging Face repo id")
    try:
        return Path(huggingface_hub.snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:
        raise OptiqError(f"cannot download adapter {source!r} from the Hugging Face Hub: {exc}")


class AdapterSelector:
    """Which mounted adapter the next forward pass uses (None: the base model).

    One engine thread sets it before each batch step; every mounted layer reads it.
    """

    def __init__(self):
        self.active = None


class _Slots:
    # A plain holder keeps the adapters out of the module's parameter tree.
    def __init__(self):
        self.by_name = {}


class MultiLoRALinear(nn.Module):
    """A base linear (plain or quantized) with any number of named LoRA adapters."""

    def __init__(self, base: nn.Module, selector: AdapterSelector):
        super().__init__()
        self.base = base
        self.selector = selector
        self.slots = _Slots()

    def __call__(self, x):
        y = self.base(x)
        adapter = self.slots.by_name.get(self.selector.active)
        if adapter is None:
            return y
        a, b, scale = adapter
        return y + (scale * ((x @ a.astype(x.dtype)) @ b.astype(x.dtype))).astype(y.dtype)


def mount(model: nn.Module, name: str, weights: LoRAWeights, selector: AdapterSelector):
    """Add an adapter under `name`, wrapping each target linear once."""
    modules = dict(model.named_modules())
    missing = [p for p in weights.modules if p not in modules]
    if missing:
        raise OptiqError(f"adapter {name!r} ({weights.source}) targets modules the model lacks: {missing[:3]}")
    for path, (a, b, scale) in weights.modules.items():
        layer = modules[path]
        if not isinstance(layer, MultiLoRALinear):
            parent_path, _, leaf = path.rpartition(".")
            layer = MultiLoRALinear(layer, selector)
            (modules[parent_path] if parent_path else model).update_modules({leaf: layer})
        out_dims = layer.base.weight.shape[0]
        if b.shape[1] != out_dims:
            raise OptiqError(f"adapter {name!r}: {path} has output size {b.shape[1]}, the model's is {out_dims}")
        layer.slots.by_name[name] = (a, b, scale)
    mx.eval([w for (a, b, _) in weights.modules.values() for w in (a, b)])
