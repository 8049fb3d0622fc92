"""laminar: what is learned from a run afterwards. Reads the files runs write; of `sim` it imports only
the definitions of those files' formats, sim/record/log_format.py and sim/record/summary.py (standard library only:
no torch)."""
