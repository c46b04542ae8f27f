"""Performance benchmarks of fdcr_mpi (issue #7): ``make bench`` or ``python -m benchmarks.run``.

Benchmarks measure; they never assert. ``benchmarks.run --quick`` checks the harness in under
two minutes; the full mode writes the figures the project reports.
"""
