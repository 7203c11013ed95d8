"""Sensitivity probes spread over processes with MLX's own distributed engine.

Started with `mlx.launch -n N [--backend ring|mpi] ...`, every process loads
the model and the calibration tokens, measures its share of the probes
(probe k goes to rank k mod N), and one `mx.distributed.all_sum` gathers the
table: each rank contributes its KLs and zeros elsewhere, so every rank ends
with the same numbers a single process measures. Only rank 0 writes output.
Without mlx.launch the group has size 1 and nothing changes.
"""

import mlx.core as mx


def group():
    """The process group (size 1 when not launched by mlx.launch)."""
    return mx.distributed.init()


def is_writer() -> bool:
    return group().rank() == 0


def mine(index: int) -> bool:
    """Whether this rank measures probe `index`."""
    g = group()
    return index % g.size() == g.rank()


def gather(values: dict, keys: list) -> dict:
    """{key: value} over all ranks, each rank holding the values of its share."""
    g = group()
    if g.size() == 1:
        return dict(values)
    dense = mx.array([float(values.get(k, 0.0)) for k in keys], dtype=mx.float64)  # exact: one term per key is non-zero
    total = mx.distributed.all_sum(dense, group=g, stream=mx.cpu)
    return dict(zip(keys, total.tolist()))
