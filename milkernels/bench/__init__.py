"""Benchmarks of the milkernels ops: ``python -m milkernels.bench`` (see :mod:`.__main__`).

:mod:`.registry` holds the ops and implementations, :mod:`.sweep` times them, :mod:`.timing`,
:mod:`.roofline` and :mod:`.report` measure, rate and write the results. An op's entry lives in
its own module (:mod:`.gated_attention`).
"""
