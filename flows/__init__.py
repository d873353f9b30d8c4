"""Prefect flows: they only wire the tasks in `tasks/`; every stage's logic lives in `leanpo_core`."""
