"""shapeprof: where does the time go on a given GPU, and why."""
