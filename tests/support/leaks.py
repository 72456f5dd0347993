"""Finding API keys and service tokens where they must never be: log records, log files and trace
files."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from services.metadata.keys import KEY_PREFIX
from shared.logs import JsonFormatter
from shared.service_auth import TOKEN_PREFIX

API_KEY = re.compile(f"(?:{re.escape(KEY_PREFIX)}|{re.escape(TOKEN_PREFIX)})" + r"[A-Za-z0-9_-]{43}")
"""An API key as metadata issues them (`new_secret`), or a service token as `renderflow run` and
the tests make them (`new_service_token`)."""
WRITTEN_FILES = ("*.log", "*.log.*", "*.jsonl", "*.jsonl.*")
"""Log and trace files, with their rotated backups."""


class KeyLeakWatch(logging.Handler):
    """Notes every log record that carries an API key anywhere: message, arguments or extras,
    formatted as the processes write them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._formatter = JsonFormatter("tests")
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self._formatter.format(record)
        except Exception:  # a record that cannot be formatted is another test's failure
            text = repr(record.__dict__)
        if API_KEY.search(text):
            self.leaks.append(f"{record.name}: {API_KEY.sub('rf_<KEY>', text)[:300]}")


def leaks_in_files(roots: Iterable[Path]) -> Iterator[str]:
    """`path:line` of every line of a log or trace file under `roots` that holds an API key."""
    for root in roots:
        for pattern in WRITTEN_FILES:
            for path in root.rglob(pattern):
                if not path.is_file():
                    continue
                with path.open("rb") as lines:
                    for number, line in enumerate(lines, 1):
                        if API_KEY.search(line.decode("utf-8", "replace")):
                            yield f"{path}:{number}"
