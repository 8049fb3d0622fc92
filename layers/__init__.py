"""laminar: what is learned. Blocks, pooling, local rules and losses, BP-SSL heads, probes.

Pure PyTorch; knows nothing of processes or ranks.
"""
