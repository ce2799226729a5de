"""pytest-benchmark of LongNet dilated attention (torchscale mode):
the ``dilated_attention`` case of :mod:`milkernels.bench.dilated_attention`, per implementation, bag size and pass
(see conftest.py)."""


def test_dilated_attention(time_op):
    time_op("dilated_attention")
