"""The one strictness policy of every persisted schema (results.json and its parts, detect.json, quantize.json,
config.json, patch_config.json, and the engine's settings they hold): unknown keys are an error.

Why forbid rather than ignore: a file superweight reads back is one it wrote, so an unknown key is a typo, a hand
edit or a writer that drifted from its readers, and each should show at once, as one line naming the file and
the key (settings.file_error_line), not vanish on the next write. Files of older versions are lifted to the
current shape by their readers (schema/migrate.py, schema/runconfig.lift) before they meet this rule."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """Base of every persisted model: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")
