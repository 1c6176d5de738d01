"""Conditions: a variant of the model measured beside base, kept as its name, the intervention that makes it and
what it does, with every name built and parsed here.

    c = RANDOM_K(cut, k=4, j=0, draws=3)      # Condition(name="rand4_0", intervention=cut, description="...")
    RANDOM_K.parse("rand4_0")                 # {"k": 4, "j": 0}; None for a name of another family
    metrics = measure(model, ids, interventions(conds), ...)    # measure/metrics.py reads name -> intervention
    protocol.interventions = descriptions(conds)                 # name -> what it does, in the record

A `Family` is a name pattern ("rand{k}_{j}") with typed fields and a description template; a name with no
field ("broken") is a family of one. The stages build conditions from these families (repair's baselines and
seeds, analyze, sparsify, sweep, detect's candidates and controls); the readers parse names with them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from superweight.core.intervene import Intervention

_FIELD = re.compile(r"\{(\w+)(?::[^}]*)?\}")
_VALUE = {int: r"-?\d+", float: r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan)", str: r".+"}


@dataclass(frozen=True)
class Condition:
    """One measured variant: its name in the results, the edit that makes it, and what that edit is."""

    name: str
    intervention: Intervention
    description: str


class Family:
    """Conditions named by one pattern: Family("rand{k}_{j}", "ablate, ... (draw j of {draws})", k=int, j=int).

    The description is formatted with the same values as the name (and any others given, like `draws`); the
    pattern-level text a protocol records (`describe`) is formatted with the others only."""

    def __init__(self, pattern: str, description: str = "", **fields: type):
        self.pattern, self.description, self.fields = pattern, description, fields
        parts, at = [], 0
        for m in _FIELD.finditer(pattern):
            parts += [re.escape(pattern[at:m.start()]), f"(?P<{m[1]}>{_VALUE[fields.get(m[1], str)]})"]
            at = m.end()
        self._regex = re.compile("".join([*parts, re.escape(pattern[at:])]))

    @property
    def key(self) -> str:
        """The pattern without format specs ("scale{s}"), how a protocol names the whole family."""
        return _FIELD.sub(r"{\1}", self.pattern)

    def name(self, **values) -> str:
        return self.pattern.format(**values)

    def parse(self, name: str) -> dict | None:
        """The field values of `name` ({} for a family of one), or None when `name` is not of this family."""
        m = self._regex.fullmatch(name)
        return None if m is None else {k: self.fields.get(k, str)(v) for k, v in m.groupdict().items()}

    def __contains__(self, name: str) -> bool:
        return self.parse(name) is not None

    def describe(self, **context) -> str:
        return self.description.format(**context)

    def __call__(self, intervention: Intervention, description: str | None = None, **values) -> Condition:
        return Condition(self.name(**values), intervention,
                         description if description is not None else self.description.format(**values))


def interventions(conditions: Iterable[Condition]) -> dict[str, Intervention]:
    """name -> intervention, what measure/metrics.measure and generate.compare take."""
    return {c.name: c.intervention for c in conditions}


def descriptions(conditions: Iterable[Condition]) -> dict[str, str]:
    """name -> description, what a record's protocol.interventions holds."""
    return {c.name: c.description for c in conditions}


def ablated_text(coords: Iterable) -> str:
    return ", ".join(map(str, coords))


def ablated_weights(broken_description: str) -> str:
    """The weights a `broken` description names ("ablate 1:5:7, 1:9:3" -> "1:5:7, 1:9:3")."""
    return broken_description.removeprefix("ablate ")


# --- every stage: the damaged model, and the repaired one ---
BROKEN = Family("broken", "ablate {weights}")
ABLATED = Family("ablated", "ablate {weights}")  # eval's name for it
PATCHED = Family("patched", "ablate, add the run's patch")

# --- repair: baselines (stages/repair.py) and patches trained from other seeds ---
ORACLE = Family("oracle", "ablate, then put the deleted values back through the patch rows")
ACTIVATION_RESTORE = Family("activation_restore", "ablate, then restore the super activation only (positions "
                                                  "where the weight's contribution is >= 10% of its batch maximum)")
RANDOM_WRITE = Family("random_same_write_{i}", "ablate, then add random vector #{i} on the same rows, writing as "
                                               "much as the trained patch (RMS of x·v)", i=int)
OTHER_ROW = Family("other_row", "ablate, then a patch trained on another (random) row of the layer ({rows}), the "
                                "recipe with a quarter of the patch's steps ({steps} here) and no held-out check")
SEED = Family("seed_{seed}", "ablate, add a patch trained like 'patched' with seed {seed}", seed=int)

# --- compensate: patches trained with neurons excluded (stages/compensate.py) ---
EXCLUDED = Family("excluded{k}", "ablate, add a patch trained with the top {k} writing neurons held at 0", k=int)
WITHOUT_DELETED = Family("without_deleted", "ablate, add a patch trained with the deleted weights' columns held at 0")

# --- analyze: the patch cut to k entries, and the weight scaled (stages/analyze.py, measure/sparsity.py) ---
TOP_K = Family("top{k}", "ablate, add the patch keeping its k largest-|d| entries", k=int)
CONTRIB_K = Family("contrib{k}", "ablate, add the patch keeping the k entries with the largest |x[i] * d[i]| at "
                                 "the token where |x @ d| is largest (the massive-activation token)", k=int)
RANDOM_K = Family("rand{k}_{j}", "ablate, add the patch keeping k random entries (draw j of {draws})", k=int, j=int)
SCALE = Family("scale{s:g}", "{weight} multiplied by s (nothing else changed)", s=float)

# --- sparsify: the i-th sparse patch ---
SPARSE = Family("sparse{i}", "ablate, add the i-th sparse patch (point i)", i=int)

# --- sweep: the weight times s, and spread over the next n columns ---
TIMES = Family("x{s:g}", "W[{row},{col}] of {where} times {s:g}", s=float)
SPREAD = Family("spread{n}", "zero it, add value/{n} to the next {n} columns", n=int)

# --- detect: each candidate zeroed alone, beside its matrix's two control weights ---
CANDIDATE = Family("cand:{coord}", "zeroed alone")
TOP_CONTROL = Family("top:{layer}:{expert}", "zeroed alone")
RANDOM_CONTROL = Family("rand:{layer}:{expert}", "zeroed alone")
