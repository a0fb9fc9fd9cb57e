"""lmmarg's benchmarks: a package of scripts, run as modules from the repository root after ``pip install -e .``::

    python -m benchmarks.paper --quick           # any benchmark: python -m benchmarks.<name> [--help]
    python -m benchmarks.report                  # merged tables, plots and results/summary.md

The package is not installed with lmmarg (pyproject.toml packages ``lmmarg*`` only); it imports lmmarg like any
user's code. The modules import each other relatively (``from .harness import ...``) and start their fresh worker
processes as ``python -m benchmarks.<name>`` with the repository root as working directory. Data: lmmarg's bundled
data sets through ``lmmarg.datasets`` (harness.read_data), the others from benchmarks/data; results go to
benchmarks/results (docs/benchmarks.md cites them).

``_bambi_worker.py`` and ``_bambi_glmm_worker.py`` are plain scripts, not modules of this package: the Bambi
virtualenv's interpreter runs them by path (peers_bambi.py, glmm_speed.py), and they import neither lmmarg nor
this package.
"""
