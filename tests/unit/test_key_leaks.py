"""The session's check that no API key is logged finds keys wherever they are written."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from services.metadata.keys import new_secret
from shared.service_auth import new_service_token
from tests.support.leaks import KeyLeakWatch, leaks_in_files


def test_a_key_in_a_message_an_argument_or_an_extra_is_found() -> None:
    watch = KeyLeakWatch()
    logger = logging.getLogger("tests.leaks")
    key = new_secret()
    for record in (
        logger.makeRecord("tests.leaks", logging.INFO, __file__, 1, f"key {key}", (), None),
        logger.makeRecord("tests.leaks", logging.INFO, __file__, 1, "offered %r", ([key],), None),
        logger.makeRecord("tests.leaks", logging.INFO, __file__, 1, "auth", (), None, extra={"h": key}),
    ):
        watch.emit(record)
    watch.emit(logger.makeRecord("tests.leaks", logging.INFO, __file__, 1, "key rf_0123456789", (), None))
    assert len(watch.leaks) == 3 and not any(key in leak for leak in watch.leaks)


def test_a_key_in_a_log_a_trace_or_a_rotated_backup_is_found() -> None:
    # Outside the session's temporary directory, which the session's own check reads.
    with tempfile.TemporaryDirectory() as directory:
        _found_in_files(Path(directory))


def _found_in_files(tmp_path: Path) -> None:
    key = new_secret()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "gateway.log").write_text("fine\n")
    (tmp_path / "logs" / "gateway.log.2").write_text(f"fine\nAuthorization: Bearer {key}\n")
    (tmp_path / "traces.jsonl").write_text(f'{{"url": "/v1/renders?api_key={key}"}}\n')
    (tmp_path / "dev-api-key").write_text(key)  # where a key belongs: not a log
    token = new_service_token()
    (tmp_path / "logs" / "metadata.log").write_text(f'{{"metadata": "authorization: Bearer {token}"}}\n')
    (tmp_path / "service-token").write_text(token)  # where it belongs
    assert sorted(leaks_in_files([tmp_path])) == [
        f"{tmp_path}/logs/gateway.log.2:2",
        f"{tmp_path}/logs/metadata.log:1",
        f"{tmp_path}/traces.jsonl:1",
    ]
