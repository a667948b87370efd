"""qabox's benchmark, run by scripts/bench (see __main__.py for what it measures).

harness: rows, ratios, running commands, the table; target: lab1 and an env of
the run's own there; one module per section (deploy, supervision, tunnel, fleet,
cli); programs/: what runs beside qabox on the host or here, as plain files.
"""
