"""mlx-lm's own calibrated quantizers as peer rows, through its functions
(mlx_lm.quant.awq.awq_quantize, mlx_lm.quant.gptq.gptq_quantize), on the
calibration tokens every other row uses, at one width everywhere (the
embedding included, so the effective bits equal uniform's)."""

import mlx.core as mx
import mlx_lm

from optiq.tasks import fp32_activations


def fresh(ref_path):
    model, _, config = mlx_lm.load(str(ref_path), return_config=True)
    return fp32_activations(model), config


def rtn_model(ref_path, tokens, bits: int = 4, group_size: int = 64):
    """mlx-lm's plain round-to-nearest (nn.quantize), the row the calibrated ones improve on."""
    import mlx.nn as nn

    model, _ = fresh(ref_path)
    nn.quantize(model, group_size, bits)
    return model


def awq_model(ref_path, tokens, bits: int = 4, group_size: int = 64):
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize

    model, config = fresh(ref_path)
    awq_config = AWQ_MODEL_CONFIGS.get(config["model_type"])
    if awq_config is None:
        raise NotImplementedError(f"mlx-lm's AWQ has no configuration for {config['model_type']}")
    awq_quantize(model, mx.array(tokens), awq_config, group_size=group_size, bits=bits, embed_group_size=group_size, embed_bits=bits)
    return model


def gptq_model(ref_path, tokens, bits: int = 4, group_size: int = 64):
    from mlx_lm.quant.gptq import gptq_quantize

    model, _ = fresh(ref_path)
    model, _ = gptq_quantize(model, mx.array(tokens), bits, group_size, bits, group_size)
    return model
