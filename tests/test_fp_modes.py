"""MLX's microscaling formats (mxfp4, nvfp4, mxfp8) as per-layer candidates
next to affine: their cost in effective bits, the candidate set, and a
convert whose written layers hold exactly the codes the probes measured,
opened by stock mlx-lm from its per-layer `mode` entries."""

import json

import mlx.core as mx
import numpy as np
import pytest

from optiq.errors import OptiqError
from optiq.pipeline.config import ConvertConfig, candidates
from optiq.records import FP_MODES, Candidate
from optiq.rounding import fake_quantize, pack, quantize_rows


def test_microscaling_costs_count_one_8_bit_scale_per_group():
    assert Candidate(4, 32, "mxfp4").effective_bits == 4.25
    assert Candidate(4, 16, "nvfp4").effective_bits == 4.5
    assert Candidate(8, 32, "mxfp8").effective_bits == 8.25
    assert Candidate(4, 64).effective_bits == 4.5  # affine: fp16 scale and bias per group
    assert {Candidate(4, 32, "mxfp4").key, Candidate(4, 32).key} == {"mxfp4@32", "4@32"}
    assert Candidate.from_dict(Candidate(4, 16, "nvfp4").to_dict()) == Candidate(4, 16, "nvfp4")


def test_candidates_take_each_format_at_its_own_width():
    got = candidates(ConvertConfig(bits=(4, 8), group_sizes=(64,), modes=("affine", "mxfp4", "nvfp4", "mxfp8")))
    assert set(got) == {Candidate(4, 64), Candidate(8, 64), Candidate(4, 32, "mxfp4"), Candidate(4, 16, "nvfp4"), Candidate(8, 32, "mxfp8")}
    only = candidates(ConvertConfig(bits=(4, 16), modes=("mxfp4",)))
    assert set(only) == {Candidate(4, 32, "mxfp4"), Candidate(16, 64)}
    with pytest.raises(OptiqError, match="add 8 to --candidate-bits"):
        candidates(ConvertConfig(bits=(4,), modes=("mxfp8",)))
    with pytest.raises(OptiqError, match="--modes"):
        candidates(ConvertConfig(bits=(4,), modes=("fp4",)))


def test_microscaling_rounding_has_no_bias_and_round_trips_through_mlx():
    w = mx.random.normal((8, 64), key=mx.random.key(0))
    for cand in (Candidate(4, 32, "mxfp4"), Candidate(4, 16, "nvfp4"), Candidate(8, 32, "mxfp8")):
        q, scales, biases = quantize_rows(w, cand)
        assert biases is None and scales.dtype == mx.uint8
        ref = mx.dequantize(*mx.quantize(w, group_size=cand.group_size, bits=cand.bits, mode=cand.mode), group_size=cand.group_size,
                            bits=cand.bits, mode=cand.mode)
        assert mx.array_equal(fake_quantize(w, cand), ref)
        assert 0 < float(mx.mean((ref - w) ** 2)) < float(mx.mean(w ** 2)) * (0.05 if cand.bits == 4 else 0.001)


def test_convert_writes_exactly_the_measured_round_to_nearest_microscaling_codes(tiny_llama, tmp_path):
    import mlx_lm
    import mlx.nn as nn

    from optiq.commands.convert import main
    from optiq.model_tree import module_at

    out = tmp_path / "fp"
    assert main([str(tiny_llama), "-o", str(out), "--target-bpw", "5", "--modes", "mxfp4,nvfp4,mxfp8", "--candidate-bits", "4,8", "--quantizer", "rtn",
                 "--n-calibration", "4", "--seq-len", "64", "--n-eval", "4", "--kl-stride", "2", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    layers = {p: e for p, e in config["quantization"].items() if isinstance(e, dict)}
    assert layers and {e["mode"] for e in layers.values()} <= {"mxfp4", "nvfp4", "mxfp8"}
    meta = json.loads((out / "optiq_metadata.json").read_text())
    assert abs(meta["effective_bpw"] - 5.0) < 0.26
    source, _ = mlx_lm.load(str(tiny_llama))
    written, tokenizer = mlx_lm.load(str(out))  # stock mlx-lm, no optiq import needed to open it
    for path, entry in layers.items():
        module = module_at(written, path)
        assert isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and module.mode == entry["mode"]
        cand = Candidate(entry["bits"], entry["group_size"], entry["mode"])
        q, scales, _ = quantize_rows(module_at(source, path).weight.astype(mx.float32), cand)
        assert mx.array_equal(module.weight, q) and mx.array_equal(module.scales, scales), path
    tokens = mx.array([tokenizer.encode("mixed precision")])
    assert np.isfinite(np.array(written(tokens).astype(mx.float32))).all()


def test_whisper_and_vlm_refuse_microscaling_modes():
    from optiq.pipeline.whisper_family import WhisperFamily

    with pytest.raises(OptiqError, match="affine mode only"):
        WhisperFamily().refuse_text_only_options(ConvertConfig(modes=("affine", "mxfp4")))


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_gptq_on_a_float_grid_is_mlx_rounding_without_correlations_and_beats_it_with_them(mode):
    from optiq.rounding import gptq_weight

    cand = Candidate(FP_MODES[mode][0], FP_MODES[mode][1], mode)
    rng = np.random.default_rng(0)
    w = mx.array(rng.normal(size=(32, 128)).astype(np.float32))
    # an identity Gram leaves no error to move: GPTQ's codes are mx.quantize's, bit for bit
    _, (q, scales, biases) = gptq_weight(w, mx.eye(128), cand)
    words, mlx_scales = mx.quantize(w, group_size=cand.group_size, bits=cand.bits, mode=mode)
    assert biases is None and np.array_equal(pack(q, cand.bits), np.array(words)) and np.array_equal(scales, np.array(mlx_scales))
    # correlated inputs: the output error GPTQ minimises falls below round-to-nearest's
    x = rng.normal(size=(512, 128)).astype(np.float32) @ rng.normal(size=(128, 128)).astype(np.float32) * 0.1
    gptq, _ = gptq_weight(w, mx.array(x.T @ x), cand)
    def output_error(wq):
        return float(np.sum((x @ (np.array(wq) - np.array(w)).T) ** 2))
    assert output_error(gptq) < 0.8 * output_error(fake_quantize(w, cand))
