"""laminar: what is learned from a run afterwards. Reads the files runs write; of `sim` it imports only
the log format's definition, sim/log_format.py (standard library only: no torch)."""
