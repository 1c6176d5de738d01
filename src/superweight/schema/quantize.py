"""The typed result of `superweight quantize` (stages/quantize.py), also kept in a run directory's quantize.json
by `run --quantize`. Its own file's schema, so its own module; it reuses the record's Metrics, Recovery and
Protocol (schema/record.py)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError

from superweight.display import Shown
from superweight.errors import SuperweightError
from superweight.io.files import read_json  # strict JSON: the one io module a schema reads files through
from superweight.schema.record import Metrics, Protocol, Record, Recovery, TaskResults
from superweight.settings import file_error_line


class KeptWeight(Record):
    """One kept (super) weight under one condition: was the weight itself changed, or its block-mates?"""

    weight: str = Field(description="LAYER:ROW:COL")
    value: float = Field(description="its fp value")
    quantized: float = Field(description="its value under this condition")
    own_error: float = Field(description="|quantized - value|: what the condition did to the weight itself")
    step: float = Field(description="quantization step of its block (range / (levels - 1); NF: the widest gap)")
    block_rmse: float = Field(description="RMS error of the other weights of its block")
    block_size: int


class QuantRow(Metrics):
    """One weight-quantization condition, measured against the same base pass as every other."""

    name: str = Field(description="BITSb/BLOCK/CONDITION, e.g. 4b/64/clip+restore")
    condition: str = Field(description="rtn, held, clip or clip+restore (patched-*: on the repaired model)")
    bits: int
    block: str = Field(description="block size, channel or tensor")
    levels: str = Field(description="int (min-max) or nf (NormalFloat)")
    clip: str | None = Field(None, description="the clipping method, or None")
    keep: str = Field(description="none, hold (out of the block range, fp) or restore (written back after clipping)")
    n_clipped: int = Field(description="weights clipped, over all quantized matrices")
    n_kept: int = Field(description="weights kept in fp")
    effective_bits: float = Field(description="bits per weight: codes + 16-bit scale and zero per block + 48 per "
                                              "kept weight (value and index)")
    recovery: Recovery | None = Field(None, description="against plain RTN of the same bits and block (1 = back "
                                                        "to base, 0 = as plain RTN, < 0 = worse than plain RTN)")
    changes: str | None = Field(None, description="what the condition changed about the super weight: the "
                                                  "weight itself, or the step of its block-mates")
    kept: list[KeptWeight] = Field(default_factory=list)


class ActRow(Metrics):
    """Activation fake-quantization (weights in fp)."""

    name: str
    bits: int
    which: str = Field(description="down (down-projection inputs) or all (every decoder linear's input)")
    hold: bool = Field(description="the super activation (super weight's column at its layer) kept in fp")
    recovery: Recovery | None = Field(None, description="against the same quantization without the hold")


class QuantFigure(Record):
    title: str
    x_label: str
    y_label: str
    log_y: bool
    x: list[str]
    series: dict[str, list[float | None]] = Field(description="line label -> one y per x")


class QuantReport(Record):
    figures: list[QuantFigure] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="findings in words (super weight vs block-mates)")


class QuantResult(Shown, Record):
    protocol: Protocol
    base: Metrics
    keep: list[str] = Field(description="the kept super weights, LAYER:ROW:COL")
    keep_source: str = Field(description="given, published (known.py), detected, or none")
    n_weights: int = Field(description="weights quantized (every decoder linear)")
    shapes: list[tuple[int, int]] = Field(description="the distinct [out, in] shapes quantized")
    rows: list[QuantRow]
    activations: list[ActRow] = Field(default_factory=list)
    patched: Metrics | None = Field(None, description="with --patch: the repaired model in fp")
    patched_rows: list[QuantRow] = Field(default_factory=list, description="with --patch: the repaired model "
                                         "quantized, the patch kept in fp (patched-rtn) or merged into its row "
                                         "and quantized with it (patched-merged)")
    tasks: TaskResults | None = None
    report: QuantReport = Field(default_factory=QuantReport)
    seconds: float | None = None


QUANTIZE_FILE = "quantize.json"  # in a run directory: written by `run --quantize`, read by the report


def read_quantize(run_dir) -> QuantResult | None:
    """A run directory's quantize.json, or None when `run` was not given --quantize."""
    path = Path(run_dir) / QUANTIZE_FILE
    if not path.is_file():
        return None
    try:
        return QuantResult.model_validate(read_json(path, "quantize result"))
    except ValidationError as exc:
        raise SuperweightError(file_error_line(exc, str(path), "a quantize result",
                                               "rerun `superweight run --quantize` into a new directory")) from None
