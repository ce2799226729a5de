"""pytest-benchmark of a whole Lin-MIL linear attention layer:
the ``lin_mil_layer`` case of :mod:`milkernels.bench.linear_attention`, per implementation, bag size and pass
(see conftest.py)."""


def test_lin_mil_layer(time_op):
    time_op("lin_mil_layer")
