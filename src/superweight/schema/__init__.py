"""The persisted schemas: every file superweight writes and reads back is one of these pydantic models.

One strictness policy for all of them, `base.Record`: unknown keys are an error, so a typo, a hand edit or a
writer that drifted from its readers shows at once, as one line naming the file and the key. Older files are
lifted to the current version when read (`migrate.py` for results.json, `runconfig.lift` for config.json and
patch_config.json), never accepted loosely.

- base.py: `Record`, the base of every model here.
- record.py: results.json, the run record (`RunRecord`, `SCHEMA_VERSION`), with Metrics and Protocol.
- training.py: the record's `training` part; the settings it ran with are the engine's (engine/config.py).
- detect.py: a detection candidate (detect.json and the record's `detect`).
- compensation.py: the record's exclusion, regime and compensation frontier.
- sinks.py: the record's mechanism view.
- quantize.py: quantize.json.
- runconfig.py: config.json (`RunConfig`) and patch_config.json (`PatchConfig`).
- migrate.py: results.json of older versions, lifted one version at a time.

This package sits low (beside io/): it imports core/ types, settings, the engine's settings (engine/config.py,
which the records hold) and io/files.py (strict JSON), never measure/, stages/, report/ or cli/.
"""
