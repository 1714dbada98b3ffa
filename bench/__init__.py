"""Benchmarks, run from the repository root (docs/benchmarks.md): `python bench/reload.py`,
`python -m bench.peers`, `python bench/servers_table.py`."""
