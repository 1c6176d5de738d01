"""A patch you hold: a trained row patch (core.patching.PatchData) with the loaded model it belongs to, and the
things one does with it, each built on core/patching.py (apply, merge), io/patchfile.py (save) and io/peft.py.

    patch = Patch.of(load_patch("runs/x"), loaded)     # sw.load_patch("runs/x", m); sw.repair(...).patch
    with patch.apply():                                 # the ablated model, repaired: ablation + row patch
        logits = loaded.model(ids).logits
    # the intact model again, bit for bit
    patch.save("patches/mine")                          # patch.safetensors + patch_config.json
    patch.export("merged/")                             # the patched model as a standalone directory
    patch.to_peft("adapter/")                           # a LoRA adapter for the intact model
    patch.merge()                                       # into the weights for good (no undo)

A patch belongs to the ablated model: it was trained to repair the model with its weights ablated, so applying,
merging and exporting it ablate them too (`core.patching.patched`); the PEFT adapter folds the ablation in.
`export_model` and `check_targets` are the `apply` command's library work, shared with `sw.apply`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

from superweight.core.arch import down_projection
from superweight.core.coords import split_row
from superweight.core.intervene import Intervention
from superweight.core.patching import PatchData, apply_patch, check_fits, merge_into_weights, patched
from superweight.errors import UsageError
from superweight.io.models import Loaded, save_model_dir


@dataclass
class Patch(PatchData):
    """A PatchData (rows, vectors, ablated, config) held with the model it was trained on (`loaded`, or the one
    each method is given). Every method checks that the patch fits the model (core.patching.check_fits)."""

    loaded: Loaded | None = field(default=None, repr=False)

    @classmethod
    def of(cls, data: PatchData, loaded: Loaded | None = None) -> Patch:
        return cls(**{f.name: getattr(data, f.name) for f in fields(PatchData)}, loaded=loaded)

    def _model(self, loaded: Loaded | None) -> Loaded:
        loaded = loaded or self.loaded
        if loaded is None:
            raise UsageError("this patch holds no model: give one (patch.apply(m)), or load it with "
                             "sw.load_patch(run_dir, m)")
        return loaded

    def intervention(self, loaded: Loaded | None = None) -> Intervention:
        """The `patched` condition (the ablation, then the row patch) on the model, not applied: for `with`, or as
        a condition of measure()."""
        model = self._model(loaded).model
        check_fits(model, self)
        return patched(model, self.ablated, self.rows, self.vectors)

    @contextmanager
    def apply(self, loaded: Loaded | None = None):
        """`with patch.apply():` the model with its weights ablated and the patch added; both undone on exit, bit
        for bit (even when the block raises). Yields the applied intervention."""
        live = apply_patch(self._model(loaded).model, self)
        try:
            yield live
        finally:
            live.remove()

    def merge(self, loaded: Loaded | None = None) -> None:
        """Ablate the weights and add the patch into the model's weights for good (no undo)."""
        merge_into_weights(self._model(loaded).model, self)

    def export(self, target: str | Path, loaded: Loaded | None = None) -> Path:
        """The patched model (weights ablated, patch merged) as a new standalone model directory (save_pretrained
        layout); the model held is left as it was."""
        check_targets(export=target)
        return export_model(self._model(loaded), self, Path(target))

    def to_peft(self, target: str | Path, loaded: Loaded | None = None, ablation_only: bool = False) -> dict:
        """A PEFT LoRA adapter for the intact model as a new directory (io/peft.py); returns its config."""
        from superweight.io.peft import write_peft

        check_targets(peft=target)
        return write_peft(self._model(loaded), self, Path(target), ablation_only)

    def save(self, target: str | Path, loaded: Loaded | None = None) -> Path:
        """patch.safetensors and patch_config.json (io/patchfile.py) into `target` (made when missing), which must
        hold no patch yet; the patch must fit the model (core.patching.check_fits)."""
        from superweight.io.patchfile import CONFIG_FILE, PATCH_FILE, write_patch

        loaded, target = self._model(loaded), Path(target)
        if (target / PATCH_FILE).exists() or (target / CONFIG_FILE).exists():
            raise UsageError(f"{target} holds a patch already; choose another directory")
        check_fits(loaded.model, self)
        target.mkdir(parents=True, exist_ok=True)
        write_patch(target, self)
        return target


def check_targets(export: str | Path | None = None, peft: str | Path | None = None,
                  ablation_only: bool = False) -> None:
    """The `apply` outputs, checked before any model loads: new, writable directories, two different ones."""
    from superweight.io.files import check_writable

    if not export and not peft:
        raise UsageError("give --export DIR (a merged model) and/or --peft DIR (a LoRA adapter)")
    if ablation_only and not peft:
        raise UsageError("--ablation-only applies to --peft (the adapter that only ablates)")
    if export and peft and Path(export).resolve() == Path(peft).resolve():
        raise UsageError("--export and --peft need two different directories")
    for opt, target in (("--export", export), ("--peft", peft)):
        if target and (Path(target).exists() or Path(target).is_symlink()):  # a dangling symlink would be replaced
            raise UsageError(f"{opt} {target} exists already; choose a new directory")
        if target:
            check_writable(target)


def export_model(loaded: Loaded, patch: PatchData, target: Path) -> Path:
    """Merge `patch` into `loaded`'s weights, write the model to the new directory `target`, and put the touched
    rows back (bit for bit), so the model held stays intact."""
    touched = {(layer, row, expert) for layer, row, expert in map(split_row, patch.rows)}
    touched |= {(c.layer, c.row, c.expert) for c in patch.ablated}
    check_fits(loaded.model, patch)
    dps = {key: down_projection(loaded.model, key[0], key[2]) for key in touched}
    saved = {key: dp.row(key[1]).detach().clone() for key, dp in dps.items()}
    try:
        merge_into_weights(loaded.model, patch)
        save_model_dir(loaded.model, loaded.tokenizer, target)
    finally:
        for key, dp in dps.items():
            dp.set_row(key[1], saved[key])
    return target
