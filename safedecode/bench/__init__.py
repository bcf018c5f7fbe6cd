"""The benchmark suite behind ``safedecode bench``: op and generation benchmarks, reports.

Modules: :mod:`machine` (machine description, copy bandwidth), :mod:`timing` (warm-up, repeats,
median / min / max), :mod:`ops` and :mod:`generate` (the cases and their runs), :mod:`report`
(JSON, markdown, PNG plots, the README section) and :mod:`cli` (the typer command). Nothing heavy
is imported here, so ``safedecode --help`` stays fast.
"""
