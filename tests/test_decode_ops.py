"""A decode step stays lean on the path a GPU runs (benchmarks/decode_ops.py counts it): per layer
at most the aten kernels measured after the lean step (benchmarks/results/decode_ops.json), one
attention call for all rows, and one host sync per step (sampling's)."""
import pytest

from benchmarks.decode_ops import per_layer

# Kernels per layer per decode step, measured (results/decode_ops.json "after"; 25, 49, 65 and 49 before
# the lean step, and the transformers-layout GLMs 53 and 37 with q, k and v apart: "separate_qkv").
MOST_KERNELS_PER_LAYER = {"chatglm": 18, "chatglm3": 34, "glm4-0414": 50, "glm4-hf": 34}


@pytest.mark.parametrize("family", sorted(MOST_KERNELS_PER_LAYER))  # chatglm2 and glm4 run chatglm3's network
def test_a_decode_step_launches_few_kernels_per_layer_and_syncs_once(family):
    row = per_layer(family, "tiny", rows=4)
    assert 0 < row["kernels_per_layer"] <= MOST_KERNELS_PER_LAYER[family], row
    attention = [name for name in row["layer_ops"] if "scaled_dot_product" in name]
    assert [row["layer_ops"][name] for name in attention] == [1], row["layer_ops"]  # all 4 rows in one call
    assert row["syncs_per_step"] == 1 and row["syncs_per_layer"] == 0, row
