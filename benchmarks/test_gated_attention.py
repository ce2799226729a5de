"""pytest-benchmark of gated attention pooling:
the ``gated_attention`` case of :mod:`milkernels.bench.gated_attention`, per implementation, bag size and pass
(see conftest.py)."""


def test_gated_attention(time_op):
    time_op("gated_attention")
