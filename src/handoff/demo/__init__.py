"""Tools around the master, never imported by it: ``handoff demo`` (``run``), its worker
``app``, the reload ``drill`` with the ``master_process`` it starts and reads, and the
``load`` generator with its ``http_responses`` reader."""
