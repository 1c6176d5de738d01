"""Move the persisted schemas from io/ into one package, superweight/schema/, and rewrite every reference.

    python scripts/move_schemas.py          # from the repository root, on a clean tree; then review and commit

One-off (issue 29): `git mv` of each module, then a rewrite of every import, dotted name and path in src/,
tests/, benchmarks/, scripts/, docs/, README.md and the Makefile, and the README's module map (the moved entries
leave the io/ row for a schema/ row). It is safe to run again on a tree where some modules have moved already
(for example after merging a branch that still edited them under io/): a module that is no longer in io/ is
skipped, and a reference already rewritten no longer matches.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# io/<old>.py -> schema/<new>.py, grouped by meaning: the run record and its parts, the settings files, migration.
MOVES = {
    "recordbase": "base",          # the one base model: unknown keys are an error
    "record": "record",            # results.json: the run record
    "trainrecord": "training",     # the record's training part (the budget spent, the held-out check)
    "detectrecord": "detect",      # a detection candidate (detect.json and the record's detect)
    "comprecord": "compensation",  # exclusion, regime and the compensation frontier
    "sinkrecord": "sinks",         # the mechanism view
    "quantrecord": "quantize",     # quantize.json
    "runconfig": "runconfig",      # config.json and patch_config.json
    "migrate": "migrate",          # reading older records
}
TEXT = ["src", "tests", "benchmarks", "scripts", "docs", "README.md", "Makefile"]
SUFFIXES = {".py", ".md", ".sh", ".ipynb", ".toml", ""}
INIT = '''"""The persisted schemas: every file superweight writes and reads back is one of these pydantic models.

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
'''


def git(*args: str) -> None:
    subprocess.run(["git", *args], cwd=ROOT, check=True)


def move_files() -> list[str]:
    schema = ROOT / "src" / "superweight" / "schema"
    schema.mkdir(exist_ok=True)
    init = schema / "__init__.py"
    if not init.exists():
        init.write_text(INIT, encoding="utf-8")
        git("add", str(init.relative_to(ROOT)))
    moved = []
    for old, new in MOVES.items():
        src = ROOT / "src" / "superweight" / "io" / f"{old}.py"
        if src.exists():
            git("mv", str(src.relative_to(ROOT)), f"src/superweight/schema/{new}.py")
            moved.append(old)
    return moved


# `superweight.io.record`, `io.record.RunRecord`, `io/record.py`, `from superweight.io import record`: the module
# name must end there (\b), so io.record does not match io.recordbase; `(?<![\w])` keeps "audio.record" out.
PATTERN = re.compile(r"(?<![\w])io([./])(" + "|".join(sorted(MOVES, key=len, reverse=True)) + r")\b")
FROM_IO = re.compile(r"from superweight\.io import (" + "|".join(MOVES) + r")\b")


def rewrite(text: str) -> str:
    text = FROM_IO.sub(lambda m: f"from superweight.schema import {MOVES[m.group(1)]}", text)
    return PATTERN.sub(lambda m: f"schema{m.group(1)}{MOVES[m.group(2)]}", text)


def rewrite_tree() -> list[str]:
    changed = []
    for top in TEXT:
        base = ROOT / top
        paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []
        for path in paths:
            if path.suffix not in SUFFIXES or "__pycache__" in path.parts or path.name == "move_schemas.py":
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            new = rewrite(text)
            if new != text:
                path.write_text(new, encoding="utf-8")
                changed.append(str(path.relative_to(ROOT)))
    return changed


def readme_map() -> bool:
    """Move the schema modules' entries from the README's io/ row to a schema/ row right after it."""
    path = ROOT / "README.md"
    lines = path.read_text(encoding="utf-8").split("\n")
    at = next((i for i, ln in enumerate(lines) if ln.startswith("| `io/` |")), None)
    if at is None or any(ln.startswith("| `schema/` |") for ln in lines):
        return False
    head, body = lines[at].split("|")[1], lines[at].split("|", 2)[2].rstrip().rstrip("|").strip()
    keep, moved = [], {}
    for item in body.split(" · "):
        name = re.match(r"`(\w+)\.py`", item)
        if name and name.group(1) in MOVES:
            moved[MOVES[name.group(1)]] = re.sub(r"^`\w+\.py`", f"`{MOVES[name.group(1)]}.py`", item)
        else:
            keep.append(item)
    order = [MOVES[m] for m in MOVES if MOVES[m] in moved]
    lines[at] = f"|{head}| {' · '.join(keep)} |"
    moved["base"] = "`base.py` (`Record`, the one strictness policy: unknown keys are an error)"
    lines.insert(at + 1, "| `schema/` | the persisted schemas, grouped by meaning · " + " · ".join(moved[m] for m in order)
                 + " |")
    path.write_text("\n".join(lines), encoding="utf-8")
    return True


def layout_rule() -> bool:
    """Give schema/ its layer in tests/test_layout.py: beside io/ (it imports core/ types and settings only)."""
    path = ROOT / "tests" / "test_layout.py"
    text = path.read_text(encoding="utf-8")
    if '"schema":' in text or '"io": 2, ' not in text:
        return False
    path.write_text(text.replace('"io": 2, ', '"io": 2, "schema": 2, ', 1), encoding="utf-8")  # then wrap the line
    return True


def main() -> int:
    if subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0:
        print("the tree has uncommitted changes: commit or stash them first", file=sys.stderr)
        return 1
    moved = move_files()
    changed = rewrite_tree()
    mapped = readme_map()
    layered = layout_rule()
    print(f"moved {len(moved)} module(s): {', '.join(moved) or 'none'}")
    print(f"rewrote references in {len(changed)} file(s)" + ("; README module map: schema/ row added" if mapped else "")
          + ("; tests/test_layout.py: schema/ at io's layer" if layered else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
