"""The mechanism view's part of the run record (`analyze`, measure/sinks.py): per layer, the attention sink, the
residual norm and the attention entropy under base, broken and patched. schema/record.py holds it as `sinks`;
docs/results.md says what each key means."""

from __future__ import annotations

from pydantic import Field

from superweight.schema.base import Record as _Part


class SinkCondition(_Part):
    """One layer under one condition (measure/sinks.py)."""

    sink_mass: float = Field(description="attention mass on the sink tokens, mean over heads (each head: mean over "
                                         "the queries after the first sink token)")
    sink_mass_std: float = Field(description="standard deviation of the per-head sink mass over heads")
    sink_heads: float = Field(description="share of heads whose sink mass exceeds Sinks.threshold")
    entropy: float = Field(description="attention entropy (nats), mean over heads and queries")
    norm_massive: float = Field(description="residual-stream L2 norm after the block at the massive-activation token")
    norm_typical: float = Field(description="the median of that norm over the window's other (non-sink) tokens")


class SinkLayer(_Part):
    layer: int
    conditions: dict[str, SinkCondition] = Field(description="base, broken, patched -> this layer's numbers")
    entropy_undone: float | None = Field(
        None, description="1 - sum_h |H_patched - H_base| / sum_h |H_broken - H_base| over heads h: the share of "
                          "the ablation's attention-entropy change the patch undoes; null where it changes none")


class Sinks(_Part):
    """The mechanism view (`analyze`): per layer, the attention sink and the residual norm, base/broken/patched."""

    channel: str = Field(description="LAYER:ROW, the residual channel whose massive activation marks the sink tokens")
    window: int = Field(description="tokens per window, BOS included")
    windows: int
    n_tokens: int = Field(description="text tokens read (windows x text tokens per window)")
    threshold: float = Field(description="a head has a sink when its sink mass exceeds this")
    massive_fraction: float = Field(description="sink tokens: |channel| >= this x its window maximum (and a BOS)")
    break_drop: float = Field(description="the sink breaks where broken sink mass < (1 - this) x base's")
    positions: list[list[int]] = Field(description="the sink tokens' positions, per window")
    layers: list[SinkLayer]
    breaks_at: int | None = Field(None, description="first layer where the sink breaks; null: it never does")
    restored: float | None = Field(
        None, description="from breaks_at on: sum(patched - broken) / sum(base - broken) of the sink mass")
    seconds: float
