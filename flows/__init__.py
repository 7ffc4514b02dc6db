"""Prefect flows: thin callers of the stage functions in ``rlhf_tasks``."""
