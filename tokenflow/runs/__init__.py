"""The run folder's contract: its file names, the metrics.json record, the overrides, finding run and job folders."""
