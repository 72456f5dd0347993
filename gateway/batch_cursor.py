"""Where a client is in a batch's event stream, as the `id:` of each Server-Sent Event.

A batch's renders each number their events from 1, so no single seq says where a stream stands.
The cursor is every render's last seq seen, in the batch's render order, dot-separated (`3.0.7`;
renders after the last one seen are left out), which a client sends back as `Last-Event-ID` to
resume with neither gap nor repeat.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from renderflow.v1 import generation_pb2

from shared.errors import ValidationFailed

_FORMAT = re.compile(r"[0-9]{1,18}(\.[0-9]{1,18})*")  # ASCII: `\d` admits `٣`


class BatchCursor:
    """The last seq seen of each render of a batch."""

    def __init__(self, render_ids: Sequence[str], seqs: Sequence[int] = ()) -> None:
        self._index = {render_id: i for i, render_id in enumerate(render_ids)}
        self.seqs = [*seqs, *[0] * (len(render_ids) - len(seqs))]

    @classmethod
    def parse(cls, text: str, render_ids: Sequence[str], field: str) -> BatchCursor:
        """The cursor `text` names (empty: the start); ValidationFailed on `field` when it is not one
        of this batch's."""
        if not text:
            return cls(render_ids)
        if not _FORMAT.fullmatch(text):
            raise ValidationFailed.field(field, "must be seqs separated by dots, as the stream's ids are")
        seqs = [int(part) for part in text.split(".")]
        if len(seqs) > len(render_ids):
            raise ValidationFailed.field(
                field, f"has {len(seqs)} seqs; the batch has {len(render_ids)} renders"
            )
        return cls(render_ids, seqs)

    def advance(self, event: generation_pb2.RenderEvent) -> str:
        """The cursor once `event` has been seen, as an SSE id."""
        index = self._index.get(event.render_id)
        if index is not None:
            self.seqs[index] = max(self.seqs[index], event.seq)
        return str(self)

    def __str__(self) -> str:
        seen = len(self.seqs)
        while seen > 1 and self.seqs[seen - 1] == 0:
            seen -= 1
        return ".".join(str(seq) for seq in self.seqs[:seen])
