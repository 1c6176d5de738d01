"""The base of every part of the run record: unknown keys are an error (a typo or a drifted writer shows at once).
Its own module so the record's parts can live in several (schema/record.py, schema/training.py, schema/sinks.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """Base of every part: unknown keys are an error (a typo or a drifted writer shows at once)."""

    model_config = ConfigDict(extra="forbid")
