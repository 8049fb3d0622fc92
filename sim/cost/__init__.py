"""What a run costs: the pure cost model (`model`: arithmetic on block shapes and measured times) and,
beside it, what times this machine (`measure`). Imports pipeline, record and data; never run."""
