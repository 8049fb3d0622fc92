"""laminar: what is learned from a run afterwards. Reads the files runs write; of `sim` it imports only
the definitions of those files' formats, sim/log_format.py and sim/summary.py (standard library only:
no torch)."""
