"""Prefect tasks: thin wrappers that validate a config, call one `leanpo_core` stage, and return a small manifest."""
