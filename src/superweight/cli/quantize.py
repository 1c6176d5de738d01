"""`quantize`: round-to-nearest fake quantization with the super weights in mind (stages/quantize.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from superweight.cli.common import (
    DEFAULT_CORPUS, DEFAULT_MODEL, Bar, BosOpt, CorpusOpt, DeviceOpt, IncludePathOpt, JsonOpt, ModelOpt, SplitOpt,
    TaskLimitOpt, TasksOpt, app, check_json, err, errors, model_to_load, out, progress, task_spec, write_result,
)
from superweight.errors import UsageError
from superweight.report import terminal


def parse_keep(text: str):
    """'auto', 'none' or LAYER:ROW:COL,...: (coordinates or None for auto, source)."""
    from superweight.core.coords import parse_coords
    from superweight.errors import CoordinateError

    if text in ("auto", "none"):
        return (None if text == "auto" else []), text
    try:
        coords = parse_coords([t for t in text.split(",") if t.strip()])
    except CoordinateError as exc:
        raise UsageError(f"invalid --keep: {exc}") from None
    if any(c.scale != 0.0 for c in coords):
        raise UsageError(f"invalid --keep '{text}': give LAYER:ROW:COL without @SCALE")
    return coords, "given"


def parse_protect(text: str | None, clip) -> list[int]:
    if text is None:
        return []
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise UsageError(f"invalid --protect '{text}': expected comma-separated counts of at least 1, e.g. 16,128")
    if clip is None:
        raise UsageError("--protect restores clipped weights: give a --clip method too")
    return sorted({int(p) for p in parts})


@app.command()
@errors
def quantize(
    model: ModelOpt = DEFAULT_MODEL,
    bits: Annotated[str, typer.Option(help="weight bits, comma-separated, each 2-8")] = "4",
    block: Annotated[str, typer.Option(help="block sizes, comma-separated: integers, channel, tensor")] = "64,128,256,channel",
    levels: Annotated[str, typer.Option(help="int (min-max RTN) or nf (NormalFloat NF3/NF4, computed by hand)")] = "int",
    clip: Annotated[str, typer.Option(help="none, tensor:P, block:P (fraction clipped), zscore:Z or iqr:K")] = "tensor:1e-4",
    keep: Annotated[str, typer.Option(help="super weights to protect: auto (published, else detected), none, or "
                                           "LAYER:ROW:COL,...")] = "auto",
    protect: Annotated[Optional[str], typer.Option(
        help="with --clip: also K,... conditions that restore the K clipped weights changing their layer's output "
             "most ((|w| - threshold) x max|x|, on train-split tokens) besides the super weights")] = None,
    activations: Annotated[Optional[str], typer.Option(
        help="also quantize activations per tensor: int8 (down-projection inputs) or int8:all (every linear input)")] = None,
    patch: Annotated[Optional[str], typer.Option(help="a repair's run directory: the repaired model too")] = None,
    corpus: CorpusOpt = DEFAULT_CORPUS,
    split: SplitOpt = "eval",
    max_tokens: Annotated[int, typer.Option(help="tokens of the corpus to score")] = 2048,
    max_length: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    plot: Annotated[Optional[str], typer.Option(help="PNG of PPL against block size")] = None,
    tasks: TasksOpt = None,
    include_path: IncludePathOpt = None,
    task_limit: TaskLimitOpt = None,
    device: DeviceOpt = "cpu",
    dtype: Annotated[str, typer.Option(
        help="fp32 (default: fake-quantized values are then exact), auto, bf16 or fp16 (each dequantized value "
             "is rounded again to the model's dtype)")] = "fp32",
    bos: BosOpt = "auto",
    json_: JsonOpt = None,
):
    """Fake-quantize every decoder linear (RTN, per block), with the super weights held out, clipped or restored."""
    import superweight.api as sw
    from superweight.core.quant import check_levels, parse_bits, parse_blocks, parse_clip
    from superweight.settings import revalidated

    # Every option is checked before the (slow) load: here, and in sw.quantize (the block sizes, the corpus).
    bit_list, blocks, clip_spec = parse_bits(bits), parse_blocks(block), parse_clip(clip)
    check_levels(levels, bit_list)
    coords, source = parse_keep(keep)
    cfg = sw.QuantizeConfig(bits=bit_list, blocks=blocks, levels=levels, clip=clip_spec, keep=coords or [],
                            keep_source=source, activations=sw.parse_activations(activations), corpus=corpus,
                            split=split, max_tokens=max_tokens, max_length=max_length,
                            protect=parse_protect(protect, clip_spec))
    later = model_to_load(model, {"device": device, "dtype": dtype}, bos)
    check_json(json_, plot)
    cfg = revalidated(cfg, tasks=task_spec(tasks, include_path, task_limit))
    with progress() as bar:
        result = sw.quantize(later, keep="auto" if coords is None else coords or "none", patch=patch, config=cfg,
                             progress=Bar(bar, "Quantizing"))
    terminal.print_quantize(out, result)
    if plot:
        from superweight.report.plots import save_quantize_plot

        save_quantize_plot(result, plot)
        err.print(f"Wrote {plot}")
    write_result(json_, result)
