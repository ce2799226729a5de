"""pytest-benchmark of LiteMIL's learned-query attention pooling:
the ``litemil_pool`` case of :mod:`milkernels.bench.query_attention`, per implementation, bag size and pass
(see conftest.py)."""


def test_litemil_pool(time_op):
    time_op("litemil_pool")
