"""Prefect orchestration of nst: thin flows and tasks over the nst library."""
