"""Published super-weight coordinates (layer, row, col), keyed by hub id: what `detect`'s table and the census
compare their findings with, and what `quantize --keep auto` holds out.

Sources: Yu et al. 2024, "The Super Weight in Large Language Models" (Apple), table 1 and appendix, and the
coordinates published with its code (Apple's `ml-superweight` repository): Llama-30B, and Meta-Llama-3-8B and
its Instruct model (the same three weights); SmolLM2-135M measured on the embedded GGUF.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from superweight.core.arch import ModelInfo, describe
from superweight.core.coords import WeightCoord

PUBLISHED: dict[str, list[tuple[int, int, int]]] = {
    "allenai/OLMo-1B-0724-hf": [(1, 1764, 1710), (2, 1764, 8041)],
    "allenai/OLMo-7B-0724-hf": [(1, 269, 7467), (2, 269, 8275), (7, 269, 453), (24, 269, 2300)],
    "huggyllama/llama-7b": [(2, 3968, 7003)],
    "mistralai/Mistral-7B-v0.1": [(1, 2070, 7310)],
    "huggyllama/llama-13b": [(2, 2231, 2278), (2, 2231, 6939)],
    "huggyllama/llama-30b": [(3, 5633, 12817), (3, 5633, 17439), (10, 5633, 14386)],
    "meta-llama/Meta-Llama-3-8B": [(1, 788, 2427), (1, 1384, 2427), (1, 4062, 2427)],
    "meta-llama/Meta-Llama-3-8B-Instruct": [(1, 788, 2427), (1, 1384, 2427), (1, 4062, 2427)],
    "microsoft/Phi-3-mini-4k-instruct": [
        (2, 525, 808), (2, 1693, 808), (2, 1113, 808), (4, 525, 2723), (4, 1113, 2723), (4, 1693, 2723),
    ],
    "smollm2-135m": [(11, 507, 1229)],
    "HuggingFaceTB/SmolLM2-135M-Instruct": [(11, 507, 1229)],
}


def published(spec: str) -> list[WeightCoord]:
    """The known super weights of a model spec, or [] when none are recorded."""
    return [WeightCoord(layer=l, row=r, col=c) for l, r, c in PUBLISHED.get(spec, [])]


@dataclass(frozen=True)
class Info:
    """What `superweight info` shows: the model's architecture (core.arch.describe), where it was read from, and
    its published super weights."""

    spec: str
    source: str
    arch: ModelInfo
    published: list[WeightCoord]

    def as_json(self) -> dict:
        """The command's --json: the architecture's fields, the source and the published weights."""
        return {**asdict(self.arch), "source": self.source, "published": [c.model_dump() for c in self.published]}


def model_info(loaded) -> Info:
    """The Info of a loaded model (io/models.Loaded)."""
    return Info(spec=loaded.spec, source=loaded.source, arch=describe(loaded.model), published=published(loaded.spec))
