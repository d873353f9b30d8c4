"""Experiments that run the pipeline end to end and write a report (see experiments/README.md)."""
