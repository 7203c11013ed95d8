"""optiq lora {train,info,export}: LoRA with a rank per layer from the bits or sensitivity.

The rank per layer follows the bits or the measured sensitivity; adapters are
written in PEFT's format (and mlx-lm's on export)."""

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx_lm

from . import announce_device, fail, run_command, script_entry
from ..cpu import adapt_for_cpu
from ..errors import OptiqError
from ..io import atomic_output, check_output, write_json
from ..lora.adapters import read_adapter
from ..lora.formats import PLAN_FILE, read_plan, write_mlx_lm, write_peft
from ..lora.plan import SCALINGS, weight_signals
from ..lora.residual import INITS, plan_from_residual, start_from_residual
from ..lora.train import apply_plan, check_data, load_datasets, lora_weights, reference_linears, target_dims, train, trainable_count
from ..source import recorded_source, resolve_model


@dataclass
class TrainOptions:
    model: Optional[str] = field(default=None, metadata=dict(args=["model"], nargs="?", help="an optiq model, any mlx-lm model, .gguf or repo id (default: embedded SmolLM2)"))
    data: str = field(default="", metadata=dict(help="folder with train.jsonl (and valid.jsonl) in mlx-lm's formats"))
    output: str = field(default="adapter", metadata=dict(args=["-o", "--output"]))
    rank: int = 8
    rank_scaling: str = field(default="constant", metadata=dict(choices=list(SCALINGS), help="by_error: ranks from each layer's quantization-residual spectrum (needs the float reference)"))
    init: str = field(default="zero", metadata=dict(choices=list(INITS), help="residual: start each adapter at the top singular directions of W_ref - dequant(Q(W)) (LoftQ)"))
    reference: Optional[str] = field(default=None, metadata=dict(help="the float model the quantized one came from, for by_error and --init residual (default: the source recorded in optiq_metadata.json)"))
    param_budget: Optional[int] = field(default=None, metadata=dict(help="total trainable parameters, spread by the scaling rule"))
    alpha_ratio: float = field(default=2.0, metadata=dict(help="alpha = ratio x rank per module (PEFT scale alpha/r)"))
    target_modules: str = ",".join(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    num_layers: int = field(default=-1, metadata=dict(help="adapt the last N blocks (-1: all)"))
    iters: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    max_seq_length: int = 512
    steps_per_eval: int = 50
    steps_per_save: int = 50
    val_batches: int = 25
    mask_prompt: bool = field(default=True, metadata=dict(help="train on completions only (chat and prompt/completion data)"))
    dtype: str = field(default="auto", metadata=dict(choices=["auto", "float32", "native"]))
    seed: int = 0
    force: bool = False
    no_resume: bool = field(default=False, metadata=dict(help="ignore checkpoints in OUTPUT.partial"))


def resolve_reference(opts: TrainOptions, metadata: dict):
    """The float model's folder, when the rule or the init needs it (else None)."""
    if opts.rank_scaling != "by_error" and opts.init != "residual":
        return None
    return recorded_source(opts.reference, metadata, "--rank-scaling by_error and --init residual")


def run_train(opts: TrainOptions):
    if not opts.data:
        raise OptiqError("--data is required (a folder with train.jsonl)")
    if opts.rank < 1 or opts.iters < 1 or opts.batch_size < 1:
        raise OptiqError("--rank, --iters and --batch-size must be at least 1")
    data = Path(opts.data)
    check_data(data)
    out = Path(opts.output)
    check_output(out, opts.force)
    folder = resolve_model(opts.model)
    meta_path = folder / "optiq_metadata.json"
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    reference = resolve_reference(opts, metadata)
    announce_device()
    mx.random.seed(opts.seed)
    model, tokenizer = mlx_lm.load(str(folder))
    if opts.dtype == "float32" or (opts.dtype == "auto" and mx.default_device() == mx.cpu):
        adapt_for_cpu(model)
    weight_plan, table = weight_signals(metadata) if metadata else (None, None)
    targets = tuple(t.strip() for t in opts.target_modules.split(",") if t.strip())
    dims = target_dims(model, targets, None if opts.num_layers < 0 else opts.num_layers)
    try:
        plan, factors = plan_from_residual(model, dims, reference_linears(reference, dims) if reference else None, opts.init, opts.rank,
                                           opts.rank_scaling, plan=weight_plan, table=table, param_budget=opts.param_budget,
                                           alpha_ratio=opts.alpha_ratio, base_model=opts.model or folder.name)
    except ValueError as exc:
        raise OptiqError(f"{exc}" + ("" if meta_path.exists() else f" ({folder} has no optiq_metadata.json)"))
    train_set, valid_set = load_datasets(data, tokenizer, opts.mask_prompt)
    apply_plan(model, plan)
    assert trainable_count(model) == plan.trainable_params
    if factors is not None and opts.init == "residual":
        left = start_from_residual(model, plan, factors)
        print(f"adapters start at the quantization residual's top directions: {1 - left:.1%} of its energy held", flush=True)
    print(f"LoRA {plan.scaling}: {len(plan.modules)} modules, ranks {min(m.rank for m in plan.modules)}-{max(m.rank for m in plan.modules)}, "
          f"{plan.trainable_params:,} trainable parameters", flush=True)
    work = out.with_name(out.name + ".partial")
    reports, resumed = train(model, plan, train_set, valid_set, work, opts.iters, opts.lr, opts.batch_size,
                             opts.max_seq_length, opts.steps_per_eval, opts.steps_per_save, opts.val_batches, not opts.no_resume)
    with atomic_output(out, force=opts.force) as tmp:
        write_peft(tmp, plan, lora_weights(model, plan), len(model.layers))
        write_json(tmp / "training_log.json", dict(validation=reports.val, training=reports.train, resumed_from=resumed, iters=opts.iters))
    shutil.rmtree(work, ignore_errors=True)
    last = reports.val[-1]["val_loss"] if reports.val else float("nan")
    print(f"wrote {out} (PEFT format): validation loss {last:.4f}" + (f", resumed from iteration {resumed}" if resumed else ""))


@dataclass
class InfoOptions:
    adapter: str = field(metadata=dict(args=["adapter"], help="a folder written by optiq lora train"))


def run_info(opts: InfoOptions):
    folder = Path(opts.adapter)
    weights = read_adapter(folder)  # validates the files, whatever wrote them
    if (folder / PLAN_FILE).exists():
        plan = read_plan(folder)
        rows = [(m.path, m.rank, m.alpha, m.params) for m in plan.modules]
        base, rule = plan.base_model, f"{plan.scaling} (base rank {plan.base_rank}, alpha = {plan.alpha_ratio:g} x rank)"
    else:
        rows = [(p, a.shape[1], s * a.shape[1], a.shape[1] * (a.shape[0] + b.shape[1])) for p, (a, b, s) in weights.modules.items()]
        base, rule = weights.base_model or "?", "unknown (no optiq_lora_config.json)"
    width = max(len(r[0]) for r in rows)
    print(f"{'module':{width}}  rank  alpha  params")
    for path, rank, alpha, params in rows:
        print(f"{path:{width}}  {rank:4d}  {alpha:5g}  {params:,}")
    print(f"\nbase model: {base}\nrank scaling: {rule}\nmodules: {len(rows)}\ntrainable parameters: {sum(r[3] for r in rows):,}")


@dataclass
class ExportOptions:
    adapter: str = field(metadata=dict(args=["adapter"]))
    output: str = field(metadata=dict(args=["-o", "--output"]))
    format: str = field(default="mlx-lm", metadata=dict(choices=["mlx-lm"]))
    force: bool = False


def run_export(opts: ExportOptions):
    folder = Path(opts.adapter)
    weights = read_adapter(folder)
    plan = read_plan(folder)
    if plan.n_layers < 1:
        raise OptiqError(f"{folder}: the plan does not record the base model's layer count; export needs it")
    with atomic_output(opts.output, force=opts.force) as tmp:
        try:
            write_mlx_lm(tmp, plan, {p: (a, b) for p, (a, b, _) in weights.modules.items()}, plan.n_layers)
        except ValueError as exc:
            raise OptiqError(str(exc))
    print(f"wrote {opts.output} (mlx-lm adapter: mlx_lm.load(model, adapter_path={opts.output!r}))")


SUBCOMMANDS = {"train": (TrainOptions, run_train), "info": (InfoOptions, run_info), "export": (ExportOptions, run_export)}


def main(argv=None, prog="optiq lora") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: {prog} {{train,info,export}} ...\n{__doc__}")
            return 0
        return fail(f"usage: {prog} {{train,info,export}} ... (got {argv[0] if argv else 'nothing'})")
    options, run = SUBCOMMANDS[argv[0]]
    return run_command(options, run, argv[1:], f"{prog} {argv[0]}", run.__doc__ or __doc__)


if __name__ == "__main__":
    script_entry(main)
