"""pytest-benchmark of the linear attention core in Lin-MIL's form:
the ``linear_attention_core`` case of :mod:`milkernels.bench.linear_attention`, per implementation, bag size and pass
(see conftest.py)."""


def test_linear_attention_core(time_op):
    time_op("linear_attention_core")
