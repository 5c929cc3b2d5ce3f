"""shopstream serving: the faust app, tables, agents, scorer and metrics (no torch)."""
