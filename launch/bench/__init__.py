"""The benchmark programs: python -m launch.bench (local SSL against BP-SSL), launch.bench.pipeline,
launch.bench.log_cost and launch.bench.table (the reproduction table)."""
