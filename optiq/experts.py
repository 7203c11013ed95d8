"""Mixture-of-experts coverage: how many calibration tokens the reference
routed to each expert of each expert projection.

An expert no calibration token reached has no Gram and no measured effect:
GPTQ rounds it plainly and its layer's error estimate leaves it out. The
convert log and optiq_metadata.json say which experts those were, so a user
knows when the calibration set was too small or too narrow for the model.
"""

import numpy as np


def coverage(expert_tokens: dict) -> dict:
    """{expert projection path: {experts, min, max, unseen: [expert ids]}}
    from {path: tokens routed to each expert} (a reference pass's
    expert_tokens); gate/up/down of one block see the same routing."""
    out = {}
    for path, counts in expert_tokens.items():
        counts = np.asarray(counts)
        out[path] = {
            "experts": int(counts.size),
            "min_tokens": int(counts.min()),
            "max_tokens": int(counts.max()),
            "unseen": [int(e) for e in np.nonzero(counts == 0)[0]],
        }
    return out


def coverage_lines(cover: dict) -> list:
    """The convert log's lines: one summary, and one per layer with unseen experts."""
    if not cover:
        return []
    layers = {path.rsplit(".", 1)[0]: c for path, c in cover.items()}  # one line per block's experts
    lows = [c["min_tokens"] for c in layers.values()]
    highs = [c["max_tokens"] for c in layers.values()]
    lines = [f"experts: {len(layers)} expert layers of {next(iter(layers.values()))['experts']} experts; "
             f"calibration tokens per expert {min(lows)}..{max(highs)}"]
    for where, c in layers.items():
        if c["unseen"]:
            lines.append(f"  {where}: {len(c['unseen'])} of {c['experts']} experts saw no calibration token "
                         f"({', '.join(map(str, c['unseen'][:8]))}{', ...' if len(c['unseen']) > 8 else ''}): "
                         "rounded without GPTQ, unmeasured; more or broader --calibration reaches them")
    return lines
