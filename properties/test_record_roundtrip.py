"""Hypothesis: every record survives its JSON form unchanged."""

from hypothesis import given, settings
from hypothesis import strategies as st

from optiq.records import (
    BitPlan,
    Candidate,
    LayerSensitivity,
    QuantizedWeights,
    SensitivityTable,
    from_json,
    to_json,
)

candidates = st.builds(Candidate, st.sampled_from([1, 2, 3, 4, 5, 6, 8, 16]), st.sampled_from([32, 64, 128]))
finite = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
paths = st.from_regex(r"model\.layers\.[0-9]{1,2}\.[a-z_]{1,12}", fullmatch=True)


@st.composite
def layer_sensitivities(draw):
    cands = tuple(draw(st.lists(candidates, min_size=1, max_size=5, unique=True)))
    n = len(cands)
    return LayerSensitivity(
        path=draw(paths),
        n_params=draw(st.integers(1, 10**9)),
        candidates=cands,
        kl=draw(st.lists(finite, min_size=n, max_size=n)),
        measured=draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        error=draw(st.lists(finite, min_size=n, max_size=n)),
        calibration_digest=draw(st.text(max_size=16)),
        reference=draw(st.sampled_from(["fp32", "dequantized"])),
        roles=tuple(draw(st.lists(st.sampled_from(["embedding", "lm_head"]), max_size=2))),
    )


tables = st.builds(
    SensitivityTable,
    model=st.text(max_size=20),
    layers=st.lists(layer_sensitivities(), max_size=4).map(tuple),
    calibration_digest=st.text(max_size=16),
    n_tokens=st.integers(0, 10**6),
)
plans = st.builds(
    BitPlan,
    assignments=st.lists(st.tuples(paths, candidates), max_size=5).map(tuple),
    target_bpw=finite,
    effective_bpw=finite,
    predicted_kl=finite,
    method=st.sampled_from(["exact", "greedy"]),
    optimality_gap=finite,
)


@settings(max_examples=100)
@given(tables)
def test_sensitivity_table_round_trip(table):
    assert from_json(SensitivityTable, to_json(table)) == table


@settings(max_examples=100)
@given(plans)
def test_bit_plan_round_trip(plan):
    assert from_json(BitPlan, to_json(plan)) == plan


@settings(max_examples=50)
@given(plans, st.integers(0, 10**12), finite, st.dictionaries(st.sampled_from(["kl_mean", "top1", "perplexity"]), finite))
def test_quantized_weights_round_trip(plan, nbytes, bpw, measured):
    record = QuantizedWeights(path="out", plan=plan, bytes=nbytes, mlx_bits_per_weight=bpw, measured=measured)
    assert from_json(QuantizedWeights, to_json(record)) == record
