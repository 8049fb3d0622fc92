"""laminar: how a person starts it. Config, entry points, shipped configs."""
