"""The top room: a run from its config to its folder. Config and plan (everything derived before any
work), the job of one rank, checkpoints, the final probe, and setting up the log. Imports every room below."""
