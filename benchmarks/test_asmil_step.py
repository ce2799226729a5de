"""pytest-benchmark of an ASMIL step (learned-query tokens and the anchor's loss):
the ``asmil_step`` case of :mod:`milkernels.bench.query_attention`, per implementation, bag size and pass
(see conftest.py)."""


def test_asmil_step(time_op):
    time_op("asmil_step")
