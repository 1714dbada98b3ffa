"""Tools around the master, never imported by it: ``handoff demo`` (``run``), its worker
``app``, the reload ``drill`` and the ``load`` generator with its ``http_responses``
reader."""
