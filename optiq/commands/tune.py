"""optiq tune: learned rounding for a quantized model: its scales and biases tuned to the reference's outputs (DWQ's loss), and with --code-lr its codes.

The input is an optiq output (or any mlx-lm quantized model); the output is
the same format with new scales and biases, which stock mlx_lm.load opens.
Held-out KL against the reference is measured before and after. A stopped
run resumes from OUTPUT.partial/ (parameters, Adam's moments and the step)."""

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx_lm
from tqdm import tqdm

from . import announce_device, run_command, script_entry
from ..calibration import check_source, load_calibration, with_sampled
from ..cpu import adapt_for_cpu
from ..errors import OptiqError
from ..evaluate import quality, reference_batches
from ..io import check_output
from ..quantize import DTYPES, cast_floats, output_dtype, save_model_folder
from ..source import load_reference, read_config, recorded_source, resolve_model
from ..tune import TuneConfig, restore, settle_codes, start, state_arrays, tune_steps

STATE = "tune_state.safetensors"


@dataclass
class TuneOptions:
    model: str = field(metadata=dict(args=["model"], help="a quantized model folder (an optiq convert output or any mlx-lm one)"))
    output: str = field(metadata=dict(args=["-o", "--output"]))
    reference: Optional[str] = field(default=None, metadata=dict(help="the float model (default: the source optiq_metadata.json records)"))
    calibration: Optional[str] = field(default=None, metadata=dict(help="text file or dataset id (default: text sampled from the reference)"))
    eval_data: Optional[str] = field(default=None, metadata=dict(help="held-out text for the before/after KL (default: sampled with seed + 1)"))
    n_calibration: int = 64
    self_sampled: int = field(default=0, metadata=dict(help="N more training windows the reference writes itself, beside --calibration's "
                                                                "(WikiText's ~200 windows overfit 2048 steps; + 2048 sampled: 0.104 held-out KL against 0.108)"))
    sample_batch: int = field(default=64, metadata=dict(help="--self-sampled: sequences decoded at once"))
    n_eval: int = 8
    seq_len: int = 256
    steps: int = 200
    lr: float = field(default=3e-6, metadata=dict(help="Adam's step (benchmarks/tune_sweep.py: 3e-6 beat 1e-6 and 1e-5 up to 256 steps)"))
    batch_size: int = 4
    norm_lr: float = field(default=0.0, metadata=dict(help="> 0: the norms' weights train too, at this rate (0: scales and biases only, as DWQ)"))
    code_lr: float = field(default=0.0, metadata=dict(help="> 0: the integer codes train too (straight-through rounding), at this rate: a code flips "
                                                           "after ~0.5/rate steps of one-signed gradient; 12 more bytes of memory per weight"))
    schedule: str = field(default="constant", metadata=dict(choices=["constant", "cosine"], help="learning rate: constant, or cosine decay to 0 at --steps"))
    temperature: float = field(default=2.0, metadata=dict(help="softmax temperature of the distillation KL (DWQ's 2; 1 scored the same in the sweep)"))
    top_k: int = field(default=1024, metadata=dict(help="reference logits kept per position"))
    steps_per_save: int = 25
    seed: int = 0
    force: bool = False
    no_resume: bool = field(default=False, metadata=dict(help="ignore a checkpoint in OUTPUT.partial"))


def checked(opts: TuneOptions) -> tuple:
    """(model folder, its config, its optiq metadata): what can be refused before anything loads."""
    if min(opts.steps, opts.batch_size, opts.n_calibration, opts.n_eval, opts.top_k, opts.steps_per_save, opts.sample_batch) < 1 or opts.seq_len < 2:
        raise OptiqError("--steps, --batch-size, --n-calibration, --n-eval, --top-k, --steps-per-save and --sample-batch must be at least 1, --seq-len at least 2")
    if opts.self_sampled < 0:
        raise OptiqError(f"--self-sampled must be 0 or more, got {opts.self_sampled}")
    if opts.norm_lr < 0 or opts.code_lr < 0:
        raise OptiqError(f"--norm-lr and --code-lr must be 0 (frozen) or positive, got {opts.norm_lr} and {opts.code_lr}")
    if not opts.lr > 0 or not opts.temperature > 0:
        raise OptiqError(f"--lr and --temperature must be positive, got {opts.lr} and {opts.temperature}")
    check_output(Path(opts.output), opts.force)
    check_source(opts.calibration, "--calibration")
    check_source(opts.eval_data, "--eval-data")
    folder = resolve_model(opts.model)
    config = read_config(folder)
    if "quantization" not in config:
        raise OptiqError(f"{opts.model} is not quantized (its config.json has no quantization): tune tunes a quantized model's scales")
    meta_path = folder / "optiq_metadata.json"
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return folder, config, metadata


def run_settings(opts: TuneOptions, folder: Path, reference: Path) -> dict:
    """What decides a run's steps: a checkpoint resumes only a run with the same."""
    keep = ("calibration", "n_calibration", "self_sampled", "seq_len", "steps", "lr", "norm_lr", "code_lr", "batch_size", "schedule", "temperature", "top_k", "seed")
    # a folder is compared by its absolute path; a Hub repo id as it is (resolving it would tie it to the cwd)
    ref = Path(reference)
    return {k: getattr(opts, k) for k in keep} | {"model": str(folder.resolve()), "reference": str(ref.resolve()) if ref.exists() else str(reference)}


def check_resumable(saved: dict, settings: dict, work: Path):
    changed = sorted(k for k in settings if saved.get(k) != settings[k])
    if changed:
        was = ", ".join(f"{k} {saved.get(k)!r} -> {settings[k]!r}" for k in changed)
        raise OptiqError(f"{work / STATE} is from a run with other settings ({was}): rerun with those, or pass --no-resume to start over")


def run(opts: TuneOptions):
    folder, config, metadata = checked(opts)
    ref_path = recorded_source(opts.reference, metadata, "optiq tune")
    work = Path(opts.output).with_name(Path(opts.output).name + ".partial")
    settings = run_settings(opts, folder, ref_path)
    checkpoint = None
    if (work / STATE).exists() and not opts.no_resume:
        checkpoint, saved = mx.load(str(work / STATE), return_metadata=True)
        check_resumable(json.loads(saved.get("settings", "{}")), settings, work)  # before anything loads
    announce_device()
    reference = load_reference(ref_path)
    model, tokenizer = mlx_lm.load(str(folder))
    if mx.default_device() == mx.cpu:
        adapt_for_cpu(model)  # fp32 activations; dequantize-then-matmul keeps the scales' gradients and is fast here
    held = load_calibration(opts.eval_data, reference.tokenizer, reference.model, opts.n_eval, opts.seq_len, seed=opts.seed + 1)
    tokens = load_calibration(opts.calibration, reference.tokenizer, reference.model, opts.n_calibration, opts.seq_len, seed=opts.seed)
    tokens = with_sampled(tokens, reference.model, reference.tokenizer, opts.self_sampled, seed=opts.seed, batch_size=opts.sample_batch)
    refs = reference_batches(reference.model, held, batch_size=4)
    before = quality(model, held, refs, batch_size=4)
    tune = TuneConfig(opts.steps, opts.lr, opts.batch_size, opts.temperature, opts.top_k, opts.seed, schedule=opts.schedule, norm_lr=opts.norm_lr,
                      code_lr=opts.code_lr)
    params, opt = start(model, tune)
    done = 0
    if checkpoint is not None:
        params, opt, done = restore(checkpoint, opt)
        print(f"resuming from step {done} ({work / STATE})", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=opts.steps, initial=done, desc="tune", unit="step")

    def on_step(step, params, opt, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step % opts.steps_per_save == 0 or step == opts.steps:
            tmp = work / f".partial-{STATE}"  # mx.save_safetensors keeps a name ending in .safetensors
            mx.save_safetensors(str(tmp), state_arrays(params, opt, step), metadata={"settings": json.dumps(settings)})
            tmp.replace(work / STATE)  # a checkpoint is whole or absent

    t0 = time.time()
    params, opt, losses = tune_steps(model, reference.model, tokens, params, opt, done, opts.steps, tune, on_step)
    bar.close()
    settle_codes(model)  # MLX's packed words again: what is measured next is what is written
    seconds = time.time() - t0  # the loop's own (checkpoints included), not the measurement after
    after = quality(model, held, refs, batch_size=4)
    dtype = DTYPES[output_dtype(config)]
    cast_floats(model, dtype)
    metadata = dict(metadata, tuning=dict(steps=opts.steps, lr=opts.lr, norm_lr=opts.norm_lr, code_lr=opts.code_lr, schedule=opts.schedule, temperature=opts.temperature, batch_size=opts.batch_size, seq_len=opts.seq_len, top_k=opts.top_k,
                                          n_calibration=opts.n_calibration, self_sampled=opts.self_sampled, calibration=opts.calibration or "self-sampled", resumed_from=done,
                                          seconds=seconds, losses=losses, held_out_before=before, held_out_after=after, reference=str(ref_path)))
    save_model_folder(opts.output, model, tokenizer, config, folder, metadata, force=opts.force)
    shutil.rmtree(work, ignore_errors=True)
    print(f"held-out KL {before['kl_mean']:.4f} -> {after['kl_mean']:.4f} (top-1 {before['top1']:.3f} -> {after['top1']:.3f}) "
          f"after {opts.steps} steps in {seconds:.0f}s; wrote {opts.output}")
    return after


def main(argv=None, prog="optiq tune") -> int:
    return run_command(TuneOptions, run, argv, prog, __doc__)


if __name__ == "__main__":
    script_entry(main)
