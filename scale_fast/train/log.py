"""The run's JSONL log: one record per line, appended and flushed as it happens."""
from __future__ import annotations

import json
import os
from typing import Optional


class JsonlLog:
    """Appends records to `path` (None: writes nothing, e.g. on the ranks that do not log)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
