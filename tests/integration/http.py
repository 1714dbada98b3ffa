"""A one-shot HTTP GET for assertions (fresh connection, bounded in time)."""

from __future__ import annotations

import http.client
import json
from typing import Any


def get(port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body.startswith(b"{") else {}
    finally:
        connection.close()
