"""superweight: detect, ablate, measure and repair super weights in causal language models.

References: Yu et al., "The Super Weight in Large Language Models" (Apple, 2024); DESIGN.md.
"""

__version__ = "0.1.0"

from superweight.errors import SuperweightError  # noqa: E402

__all__ = ["SuperweightError", "__version__"]
