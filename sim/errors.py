"""The error every room of sim raises for input a user can fix: a setting that cannot run.

It lives below all the rooms (it imports nothing) so that data, pipeline and run alike can name the
key at fault; programs turn it into a line on stderr and exit code 2 (launch.program)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run: names the key and what to do instead."""
