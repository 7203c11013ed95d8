"""LoRA training at the edge: build the planned adapters on a frozen base and
train them with mlx-lm's own trainer and datasets (text, chat, completions;
prompt masking), checkpointing so a stopped run resumes."""

import json
import re
import types
from pathlib import Path

import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.trainer import TrainingArgs
from mlx_lm.tuner.trainer import train as mlx_train
from mlx_lm.utils import load_model

from ..calibration import check_jsonl
from ..errors import OptiqError
from ..records import LoRAPlan
from .residual import dequantized_weight

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_CHECKPOINT = re.compile(r"^(\d{7})_adapters\.safetensors$")


def _dims(module) -> tuple:
    out, inp = module.weight.shape
    if isinstance(module, nn.QuantizedLinear):
        inp = inp * 32 // module.bits
    return inp, out


def target_dims(model, targets=DEFAULT_TARGETS, num_layers: int | None = None) -> dict:
    """{path: (in, out)} of the target linears in the last `num_layers` blocks (all by default)."""
    n = len(model.layers)
    first = 0 if num_layers is None or num_layers < 0 else max(0, n - num_layers)
    dims = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)) or path.rsplit(".", 1)[-1] not in targets:
            continue
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", path)
        if m and int(m.group(1)) >= first:
            dims[path] = _dims(module)
    if not dims:
        raise OptiqError(f"no modules named {', '.join(targets)} in the model's last {num_layers or n} layers")
    return dict(sorted(dims.items(), key=lambda kv: (int(re.search(r"layers\.(\d+)\.", kv[0]).group(1)), kv[0])))


def apply_plan(model, plan: LoRAPlan, dropout: float = 0.0):
    """Freeze the base; wrap each planned module in mlx-lm's LoRALinear with its own rank."""
    model.freeze()
    modules = dict(model.named_modules())
    for m in plan.modules:
        parent, _, leaf = m.path.rpartition(".")
        lora = LoRALinear.from_base(modules[m.path], r=m.rank, dropout=dropout, scale=m.alpha / m.rank)
        modules[parent].update_modules({leaf: lora})
    return model


def reference_linears(folder: Path, paths) -> dict:
    """{path: fp32 (out, in) weight} of the model at `folder` (the float
    weights a quantized model came from), loaded lazily: a weight is read
    when its residual is taken."""
    model, _ = load_model(Path(folder), lazy=True)
    modules = dict(model.named_modules())
    return {p: dequantized_weight(modules[p]) for p in paths if p in modules and "weight" in modules[p]}


def lora_weights(model, plan: LoRAPlan) -> dict:
    modules = dict(model.named_modules())
    return {m.path: (modules[m.path].lora_a, modules[m.path].lora_b) for m in plan.modules}


DATA_FORMS = (("text",), ("messages",), ("prompt", "completion"))  # mlx-lm's local dataset records


def check_data(data: Path):
    """Refuse, before the model loads, a data folder mlx-lm's trainer cannot
    read: no folder, no train.jsonl, an empty or unparseable one."""
    if not data.is_dir():
        raise OptiqError(f"--data {data} is not a folder")
    if not (data / "train.jsonl").is_file():
        raise OptiqError(f"{data} has no train.jsonl (mlx-lm's data layout: train.jsonl, valid.jsonl)")
    check_jsonl(data / "train.jsonl", "--data", DATA_FORMS)
    if (data / "valid.jsonl").is_file():
        check_jsonl(data / "valid.jsonl", "--data", DATA_FORMS)


def load_datasets(data: Path, tokenizer, mask_prompt: bool):
    if not (data / "train.jsonl").exists():
        raise OptiqError(f"{data} has no train.jsonl (mlx-lm's data layout: train.jsonl, valid.jsonl)")
    try:
        train, valid, _ = load_local_dataset(data, tokenizer, types.SimpleNamespace(mask_prompt=mask_prompt))
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise OptiqError(f"{data}: {exc}")
    if len(train) == 0:
        raise OptiqError(f"{data}/train.jsonl is empty")
    return CacheDataset(train), (CacheDataset(valid) if len(valid) else None)


def latest_checkpoint(work: Path):
    """(iterations done, checkpoint file) over every run in `work`."""
    found = []
    for run in work.glob("from-*"):
        for p in run.glob("*_adapters.safetensors"):
            if m := _CHECKPOINT.match(p.name):
                found.append((int(run.name[5:]) + int(m.group(1)), p))
    return max(found) if found else (0, None)


class _Reports:
    """Keep mlx-lm's reports: validation loss per evaluation, training throughput."""

    def __init__(self):
        self.val, self.train = [], []

    def on_train_loss_report(self, info):
        self.train.append(dict(info))

    def on_val_loss_report(self, info):
        self.val.append(dict(info))


def train(model, plan: LoRAPlan, train_set, valid_set, work: Path, iters: int, lr: float, batch_size: int,
          max_seq_length: int, steps_per_eval: int, steps_per_save: int, val_batches: int = 25, resume: bool = True):
    """Train in `work` (checkpoints there); returns (reports, iterations done before this run)."""
    done, checkpoint = latest_checkpoint(work) if resume else (0, None)
    if checkpoint is not None:
        model.load_weights(str(checkpoint), strict=False)
    remaining = iters - done
    reports = _Reports()
    if remaining > 0:
        # mlx-lm numbers checkpoints from 1 in every run: one folder per run,
        # named by the iterations done before it, keeps the totals apart.
        run_folder = work / f"from-{done:07d}"
        run_folder.mkdir(parents=True, exist_ok=True)
        args = TrainingArgs(
            batch_size=batch_size, iters=remaining, val_batches=val_batches, steps_per_report=max(1, min(10, remaining)),
            steps_per_eval=steps_per_eval, steps_per_save=steps_per_save, max_seq_length=max_seq_length,
            adapter_file=str(run_folder / "adapters.safetensors"),
        )
        mlx_train(model, optim.Adam(learning_rate=lr), train_set, valid_set, args=args, training_callback=reports)
    return reports, done


def trainable_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
