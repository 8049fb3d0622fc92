"""How a laminar run executes: data feeding, placement, messages, transport, stages, schedules."""
