"""Moments as protobuf Timestamps, for every servicer."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp


def timestamp(value: datetime) -> Timestamp:
    """`value` (aware) as a Timestamp."""
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
