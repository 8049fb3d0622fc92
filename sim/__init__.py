"""How a laminar run executes, in rooms that follow a run's path, each importing only the rooms below it:
run (config, plan, job) > cost (model, measurement) > pipeline (placement, schedules, stages, transport,
engines) > record (log, summary, memory) > data (datasets, views, feed); sim.errors sits under all of them.
"""
