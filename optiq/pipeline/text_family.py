"""The text family: mlx-lm language models (multimodal checkpoints stripped
to their text part), in memory or streamed from disk, probes spread over
mlx.launch ranks, written in mlx-lm's own layout."""

import contextlib
import time

import attrs
import mlx.core as mx
import numpy as np
from mlx_lm import load as mlx_load
from mlx_lm.utils import compute_bits_per_weight

from .. import __version__, distributed
from ..calibration import check_source, digest, load_calibration, split_calibration
from ..device import describe, measuring_dtype, on_gpu
from ..errors import OptiqError
from ..evaluate import quality, reference_batches
from ..experts import coverage, coverage_lines
from ..model_tree import candidates_for, quantizable_layers
from ..plan import plan_bits
from ..probe_hooks import ProbeCache, cached, shared_by_ranks
from ..probes import measure_weights, probe_plan, rounding_for
from ..quantize import model_bytes, output_dtype, quantize, save_model_folder
from ..records import LayerSensitivity, SensitivityTable, candidate_from_key, load_sensitivity, sort_candidates
from ..reference import reference_pass
from ..refine import marginal_probes, refine
from ..rounding import DTYPES, Rounding, plan_codes
from ..source import DEFAULT_MODEL_NAME, as_measured, cache_dir, folder_digest
from ..speed import TimeBudget, layer_shapes, load_kernel_times, measure_kernel_times, missing_times, timed_pairs
from ..stream import budget_bytes, checkpoint_bytes_fp32, load_within
from ..strip import is_multimodal, strip_cached, unused_weights
from .config import ConvertConfig, check_ceiling, refits_scales, widen_defaults
from .family import Report, Written, per_block_bits, plan_summary, uniform_row


@attrs.frozen(eq=False)
class TextModel:
    loaded: object  # source.Loaded
    streamed: object  # stream.Streamed or None
    dtype: str  # the stored dtype's name
    quantizer: str
    stripped: object = None  # strip.StripReport when a multimodal checkpoint was stripped
    extra_weights: object = None  # kept towers (--keep-unused-modalities)

    @property
    def model(self):
        return self.loaded.model


@attrs.define(eq=False)
class TextCalibration:
    """The calibration sequences and, once run, the reference pass over them."""

    every: np.ndarray  # probe and Gram-only sequences (the cache key)
    tokens: np.ndarray
    gram_tokens: object
    reference: object = None
    expert_coverage: dict = attrs.field(factory=dict)  # experts.coverage of the reference's routing


def kl_free_table(model, cands) -> SensitivityTable:
    """The model's plannable layers with every candidate at zero KL: all a
    plan's feasibility depends on, before anything is measured."""
    layers = []
    for path, module in quantizable_layers(model):
        fit = candidates_for(module, cands)
        layers.append(LayerSensitivity(path, int(module.weight.size), fit, [0.0] * len(fit), [False] * len(fit), [0.0] * len(fit)))
    return SensitivityTable(model="", layers=layers)


class TextFamily:
    name = "text"

    def check(self, config: ConvertConfig, cands):
        """What can be refused before the model loads: the target's ceiling, the text sources."""
        check_ceiling(config, cands)
        check_source(config.calibration, "--calibration")
        check_source(config.eval_data, "--eval-data")

    def load(self, config: ConvertConfig, path, report: Report) -> TextModel:
        stripped = extra = None
        if is_multimodal(path):
            if config.keep_unused_modalities:
                extra = unused_weights(path)
            else:
                path, stripped = strip_cached(path)
                report.log(f"stripped {stripped.family} vision/audio parts: {stripped.removed_bytes / 2**20:.1f} MiB removed ({', '.join(stripped.removed_prefixes)})")
        loaded, streamed = load_within(path, config.max_memory)
        quantizer = config.quantizer
        if quantizer == "auto":  # GPTQ's probes and codes hold whole layers: not yet within a streaming budget
            quantizer = "rtn" if streamed else "gptq"
        elif quantizer == "gptq" and streamed:
            report.log("note: --quantizer gptq holds each layer's GPTQ codes until the model is written; the peak may exceed --max-memory")
        if streamed:
            if config.refine_rounds:
                raise OptiqError("--refine-rounds measures whole plans in memory: not with a model streamed from disk")
            report.log(f"model: {path} ({loaded.config.get('model_type')}) streamed from disk: {checkpoint_bytes_fp32(path) / 2**30:.2f} GB in fp32 > {budget_bytes(config.max_memory) / 2**30:.2f} GB; the written model is not evaluated")
        else:
            report.log(f"model: {path} ({loaded.config.get('model_type')}, reference {loaded.reference})")
        return TextModel(loaded, streamed, output_dtype(loaded.config, config.dtype), quantizer, stripped, extra)

    def candidates(self, config: ConvertConfig, loaded: TextModel, cands, report: Report) -> tuple:
        widened = widen_defaults(config, cands, quantizable_layers(loaded.model))
        if widened != cands:
            report.log(f"default candidates widened to {sorted({c.bits for c in widened})} bits: the near-uniform set cannot meet --target-bpw {config.target_bpw} here")
        return widened

    def calibrate(self, config: ConvertConfig, loaded: TextModel, report: Report) -> TextCalibration:
        model, streamed = loaded.model, loaded.streamed
        with streamed.forwarding() if streamed else contextlib.nullcontext():  # self-sampled calibration runs the model
            every = load_calibration(config.calibration, loaded.loaded.tokenizer, model, max(config.n_calibration, config.gram_samples), config.seq_len, seed=config.seed)
        tokens, gram_tokens = split_calibration(every, config.n_calibration)
        return TextCalibration(every, tokens, gram_tokens)

    def reference(self, loaded: TextModel, calibration: TextCalibration, config: ConvertConfig):
        """One reference pass, shared by the probes, refinement and GPTQ's codes."""
        if calibration.reference is None:
            calibration.reference = reference_pass(loaded.model, calibration.tokens, 8, config.kl_stride, streamed=loaded.streamed, gram_tokens=calibration.gram_tokens)
            calibration.expert_coverage = coverage(calibration.reference.expert_tokens)
        return calibration.reference

    def rounding(self, loaded: TextModel, calibration: TextCalibration, config: ConvertConfig) -> Rounding:
        return rounding_for(self.reference(loaded, calibration, config), loaded.quantizer, DTYPES[loaded.dtype], refit=config.refit_scales)

    def measure(self, config: ConvertConfig, loaded: TextModel, calibration: TextCalibration, candidates, report: Report):
        if config.sensitivity:
            try:
                table = load_sensitivity(config.sensitivity)
            except (ValueError, KeyError, TypeError) as exc:
                raise OptiqError(f"--sensitivity {config.sensitivity}: not a sensitivity table ({exc})")
        else:
            table = self._measured(config, loaded, calibration, candidates, report)
            for line in coverage_lines(calibration.expert_coverage):
                report.log(line)
        paths = {p for p, _ in quantizable_layers(loaded.model)}
        missing = [layer.path for layer in table.layers if layer.path not in paths]
        if missing:
            raise OptiqError(f"the sensitivity table names layers this model lacks: {missing[:3]}")
        return table

    def _measured(self, config, loaded, calibration, candidates, report) -> SensitivityTable:
        # Scales are rounded through the stored dtype: part of what a probe measures, so part of the key.
        # A GPU measures in the model's dtype with its own GPTQ: other numbers, another key.
        key = (f"{folder_digest(loaded.loaded.path)}-{digest(calibration.every)}-n{config.n_calibration}-s{config.kl_stride}-{loaded.quantizer}"
               + ("" if loaded.dtype == "float16" else f"-{loaded.dtype}") + ("-gpu" if on_gpu() else ""))
        cache = ProbeCache(cache_dir() / "sensitivity" / f"{key}.jsonl" if distributed.is_writer() else None)  # one writer under mlx.launch
        reference = self.reference(loaded, calibration, config)
        cands = sort_candidates(candidates)
        total = sum(len(todo) for *_, todo in probe_plan(reference.layers, cands, config.anchors))
        on_probe, bar = report.probes(total, inner=shared_by_ranks(cached(cache)))

        def gather(probed, keys):  # every rank ends with every probe; the writer caches the others' too
            probed = distributed.gather(probed, keys)
            for (path, c), kl in probed.items():
                if cache.get(path, c) is None:
                    cache.put(path, c, kl)
            return probed

        try:
            return measure_weights(
                loaded.model, reference.tokens, cands, anchors=config.anchors, model_id=config.model_name,
                reference_name=loaded.loaded.reference, kl_stride=config.kl_stride, reference=reference,
                rounding=self.rounding(loaded, calibration, config), on_probe=on_probe,
                gather=gather if distributed.group().size() > 1 else None,
            )
        finally:
            bar.close()

    def plan(self, config: ConvertConfig, loaded: TextModel, calibration: TextCalibration, table, report: Report, budget: TimeBudget | None = None):
        timed = budget.plan_args(table) if budget is not None else {}
        plan = plan_bits(table, config.target_bpw, method=config.method, protect=list(config.protect), protect_bits=config.protect_bits, **timed)
        if timed:
            report.log(f"decode matmuls ({budget.times.device}, batch {budget.times.batch}): {plan.predicted_seconds * 1e3:.3f} ms a step, "
                       f"uniform {budget.limit.key} {plan.seconds_budget * 1e3:.3f} ms ({plan.seconds_budget / plan.predicted_seconds:.3f}x its speed)")
        history = []
        if config.refine_rounds > 0:
            reference = self.reference(loaded, calibration, config)
            on_probe, bar = report.probes(marginal_probes(table, plan) * config.refine_rounds, "refine")
            try:
                plan, history = refine(reference, self.rounding(loaded, calibration, config), table, plan, config.target_bpw,
                                       config.refine_rounds, list(config.protect), config.protect_bits, on_probe)
            finally:
                bar.close()
            for i, r in enumerate(history, 1):
                report.log(f"refine round {i}: measured calibration KL {r.measured_kl:.4f} ({'kept' if r.kept else 'no better: stopped'})")
        return plan, history

    def time_budget(self, config: ConvertConfig, loaded: TextModel, cands, report: Report) -> TimeBudget:
        """--no-slower-than's budget: each layer's kernel time per candidate
        (--kernel-times, else measured on this device), checked to admit a
        plan at the target before any sensitivity is measured."""
        limit = candidate_from_key(config.no_slower_than)
        shapes = layer_shapes(loaded.model)  # a model the budget cannot cover is refused here
        timed = sort_candidates(set(cands) | {limit})  # the limit's own times make the budget
        if config.kernel_times:
            times = load_kernel_times(config.kernel_times)
            lacking = missing_times(times, shapes, timed)
            if lacking:
                (out_dim, in_dim), key = lacking[0]
                raise OptiqError(f"--kernel-times {config.kernel_times} lacks {len(lacking)} (shape, format) pairs this model needs, "
                                 f"e.g. {key} at {out_dim}x{in_dim}: measure them for this model (--no-slower-than without --kernel-times)")
        elif distributed.group().size() > 1:  # each rank would time its own kernels and plan apart
            raise OptiqError("--no-slower-than under mlx.launch needs --kernel-times (measured once, by one process)")
        else:
            bar = report.bar(len(timed_pairs(shapes.values(), timed)), "kernel times", "kernel")
            try:
                times = measure_kernel_times(shapes.values(), timed, batch=config.decode_batch,
                                             dtype=measuring_dtype(DTYPES[loaded.dtype]), device=describe(), on_time=lambda: bar.update(1))
            finally:
                bar.close()
        budget = TimeBudget(times, shapes, limit)
        blank = kl_free_table(loaded.model, cands)  # the same planner, over the plan's own candidates, refuses a target no plan meets in time
        plan_bits(blank, config.target_bpw, protect=list(config.protect), protect_bits=config.protect_bits, **budget.plan_args(blank))
        return budget

    def codes(self, config: ConvertConfig, loaded: TextModel, calibration: TextCalibration, plan):
        """GPTQ's codes for the plan (None: mlx-lm's own rounding writes every
        layer). The reference pass and its Grams are done with afterwards:
        they go before the held-out pass and the writer need the memory."""
        codes = None if loaded.quantizer == "rtn" else plan_codes(self.rounding(loaded, calibration, config), loaded.model, plan)
        calibration.reference = None
        return codes

    def summary(self, plan, report: Report):
        report.log(plan_summary(plan))
        report.log(per_block_bits(plan))

    def held_out(self, config: ConvertConfig, loaded: TextModel):
        """(tokens, reference distributions) of the held-out text, or None."""
        if not config.evaluate or loaded.streamed is not None:
            return None
        tokens = load_calibration(config.eval_data, loaded.loaded.tokenizer, loaded.model, config.n_eval, config.seq_len, seed=config.seed + 1)
        return tokens, reference_batches(loaded.model, tokens)

    def baseline(self, config: ConvertConfig, loaded: TextModel, table, candidates, held_out) -> tuple:
        tokens, refs = held_out  # mlx-lm's own rounding, through the stored dtype
        return uniform_row(loaded.model, table, candidates, config.target_bpw, lambda: quality(loaded.model, tokens, refs), Rounding("rtn", DTYPES[loaded.dtype]))

    def write(self, config: ConvertConfig, loaded: TextModel, plan, table, codes, calibration: TextCalibration, history, out):
        qmodel, qconfig = quantize(loaded.model, loaded.loaded.config, plan, dtype=loaded.dtype, codes=codes)
        metadata = {
            "optiq_version": __version__,
            "source": str(config.model or DEFAULT_MODEL_NAME),
            "reference": loaded.loaded.reference,
            "quantizer": loaded.quantizer,
            "refit_scales": refits_scales(config, loaded.quantizer),
            "calibration": {"source": config.calibration or "self-sampled", "n_sequences": int(calibration.tokens.shape[0]), "gram_sequences": int(calibration.every.shape[0]), "seq_len": int(calibration.tokens.shape[1]), "seed": config.seed, "kl_stride": config.kl_stride},
            "plan": plan.to_dict(),
            "sensitivity": table.to_dict(),
            "refinement": [attrs.asdict(r) for r in history],
        }
        if calibration.expert_coverage:
            metadata["expert_coverage"] = calibration.expert_coverage
        if loaded.stripped is not None:
            metadata["stripped"] = loaded.stripped.to_dict()
        written = Written(model_bytes(qmodel), float(compute_bits_per_weight(qmodel)))
        metadata["effective_bpw"] = plan.effective_bpw
        metadata["mlx_bits_per_weight"] = written.mlx_bpw
        metadata["predicted_kl"] = plan.predicted_kl
        # Lazy fp32 sources: each shard is computed, written and freed; a shard of
        # 4-bit output reads ~8x its size in fp32, hence 1/16 of the budget.
        shard = max(budget_bytes(config.max_memory) // 16, 2**16) if loaded.streamed else None
        save_model_folder(out, qmodel, loaded.loaded.tokenizer, qconfig, loaded.loaded.path, metadata, force=config.force, extra_weights=loaded.extra_weights, max_shard_bytes=shard)
        return written, metadata

    def measure_written(self, config: ConvertConfig, out, held_out) -> tuple:
        """(quality of what was written, opened by stock mlx-lm with fp32 activations; eval label, extras)."""
        tokens, refs = held_out
        written, _ = mlx_load(str(out))
        return dict(quality(as_measured(written), tokens, refs)), config.eval_data or "self-sampled (seed + 1)", {"n_tokens": int(tokens.size)}

    def finish(self, out, written: Written, started: float, report: Report):
        mx.clear_cache()
        report.log(f"wrote {out} ({written.nbytes / 2**20:.1f} MiB, mlx bits/weight {written.mlx_bpw:.3f}) in {time.time() - started:.0f}s; peak memory {mx.get_peak_memory() / 2**20:.0f} MiB")
