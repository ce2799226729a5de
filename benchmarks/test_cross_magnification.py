"""pytest-benchmark of CMA-MIL's cross-magnification block (10x -> 20x): the ``cross_magnification`` (dense)
and ``cross_magnification_local`` (coordinate-local) cases of :mod:`milkernels.bench.cross_attention`, per
implementation, bag size and pass (see conftest.py)."""


def test_cross_magnification(time_op):
    time_op("cross_magnification")


def test_cross_magnification_local(time_op):
    time_op("cross_magnification_local")
