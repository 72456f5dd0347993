"""The local artifact store: atomic writes named by render id, range reads in 64 KiB chunks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from services.generation.artifacts import CHUNK, LocalArtifactStore
from shared.errors import NotFound, ValidationFailed


async def _read(store: LocalArtifactStore, render_id: str, offset: int = 0, length: int = 0) -> list[bytes]:
    return [chunk async for chunk in store.read(render_id, offset, length)]


async def test_write_then_read_back_in_chunks_and_ranges(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    data = os.urandom(CHUNK * 2 + 100)
    stored = await store.put("render-1", data)
    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    chunks = await _read(store, "render-1")
    assert [len(c) for c in chunks] == [CHUNK, CHUNK, 100] and b"".join(chunks) == data
    assert (
        b"".join(await _read(store, "render-1", offset=CHUNK - 5, length=10)) == data[CHUNK - 5 : CHUNK + 5]
    )
    assert b"".join(await _read(store, "render-1", offset=len(data))) == b""
    assert await store.get("render-1") == data


async def test_a_second_write_replaces_the_first_whole_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    await store.put("render-1", b"first")
    await store.put("render-1", b"second")
    assert await store.get("render-1") == b"second"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["render-1"]


async def test_missing_outputs_bad_ranges_and_bad_ids(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(NotFound):
        await store.get("nothing-here")
    await store.put("render-1", b"12345")
    with pytest.raises(ValidationFailed):
        await _read(store, "render-1", offset=6)
    with pytest.raises(ValueError):
        store.path("../escape")
