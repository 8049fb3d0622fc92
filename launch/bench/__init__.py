"""The benchmark programs: python -m launch.bench (local SSL against BP-SSL), launch.bench.pipeline,
launch.bench.log_cost, launch.bench.table (the reproduction table), launch.bench.speed (full width
against a baseline commit and the floor) and launch.bench.memory (peak memory at 96 px)."""
