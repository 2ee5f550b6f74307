"""Benchmark drivers (``ntm bench ...``) and the report that builds every table from results/*.json."""
