"""Peers benchmark: gunicorn's own SIGHUP reload against the same gunicorn under handoff.

Run it with `python -m bench.peers` from the repository root; __main__ says what it
measures. The modules: scenarios (what is deployed, with which gunicorn command), runs
(what one run of one side takes and returns, and its time bounds), measure (the exact
maximum latency and the sampled timeline), server_logs (the output lines kept in the
results), gunicorn_side and handoff_side (one run each way), report (tables and JSON).
"""
