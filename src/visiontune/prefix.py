"""The frozen first layers' output, computed once per image.

With `--freeze N` the first N layer groups keep their pretrained weights and BatchNorm statistics for
the whole run, so their output for an image at the eval transform is the same every epoch. Those are
the high-resolution layers: on EfficientNet-Lite0 they are 52% of an eval forward at 224 px and 61% at
160 px (docs/performance.md), and every epoch's val pass (and with --refit-head the training images'
features pass) ran them again on the same images. `FrozenPrefix` keeps their output in memory, up to
a budget, from the first pass that computes it; later passes decode nothing and start after them.
With the feature cache on, it also writes them there (`store`), so a later run on the same images and
model starts its first epoch's passes after them too (a run on cached features computed them again in
its first epoch: trashnet 14 s against 11 s for the later epochs).

The split is found from the model, not from a table of architectures: the frozen modules are those
whose parameters all have requires_grad off, the first of them receives the kept output and the others
pass it on. It is used only when that split gives the full model's features on a random batch.
"""

from __future__ import annotations

import copy
import sys
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .folding import check_batch, pooled_features

if TYPE_CHECKING:
    from .features import FeatureCache


def frozen_module_names(model: nn.Module, frozen: list[nn.Parameter] | None = None) -> list[str]:
    """The largest modules whose parameters are all frozen (requires_grad off, or the given `frozen`), in
    registration order, with the modules without parameters between two of them (ResNet's act1 and
    maxpool): on EfficientNet with --freeze 3, conv_stem, bn1, blocks.0 and blocks.1."""
    names: list[str] = []
    frozen_ids = {id(p) for p in frozen} if frozen is not None else None

    def trains(p: nn.Parameter) -> bool:
        return p.requires_grad if frozen_ids is None else id(p) not in frozen_ids

    def state(module: nn.Module) -> str:
        params = list(module.parameters())
        if not params:
            return "none"
        return "trained" if all(trains(p) for p in params) else \
            "frozen" if not any(trains(p) for p in params) else "mixed"

    def visit(module: nn.Module, name: str) -> None:
        children = [(f"{name}.{child_name}" if name else child_name, child, state(child))
                    for child_name, child in module.named_children()]
        frozen_at = [i for i, (_, _, kind) in enumerate(children) if kind == "frozen"]
        for i, (child_name, child, kind) in enumerate(children):
            if kind == "frozen" or (kind == "none" and frozen_at and frozen_at[0] < i < frozen_at[-1]):
                names.append(child_name)
            elif kind == "mixed":
                visit(child, child_name)

    visit(model, "")
    return names


class _KeptOutput(nn.Module):
    """Stands in for the first frozen module: returns the kept output, whatever it is given."""

    def __init__(self):
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, _unused):
        return self.value


class PrefixSplit:
    """An eval-mode model (a folded copy) in two ways: whole, keeping the last frozen module's output
    (`features_keeping`), and from a kept output on (`features_from`). Both share its weights."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model = model
        self.captured: torch.Tensor | None = None
        self.image_shape: tuple[int, ...] | None = None  # one image's kept output, found by `matches`
        self.image_channels_last = False
        model.get_submodule(names[-1]).register_forward_hook(self._capture)
        # The rest shares every parameter and buffer with the model; only its module tree is copied.
        shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        self.rest = copy.deepcopy(model, memo=shared)
        self.kept = _KeptOutput()
        self.rest.set_submodule(names[0], self.kept)
        for name in names[1:]:
            self.rest.set_submodule(name, nn.Identity())

    def _capture(self, _module, _inputs, output) -> None:
        # A copy: a later layer may work in place on the tensor it was given.
        self.captured = output.detach().clone()

    def features_keeping(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled features of `inputs` and the frozen layers' output for them."""
        self.captured = None
        features = pooled_features(self.model, inputs)
        return features, self.captured

    def features_from(self, kept: torch.Tensor) -> torch.Tensor:
        """The pooled features of the images whose frozen layers' output is `kept`."""
        self.kept.value = kept
        try:
            return pooled_features(self.rest, kept)
        finally:
            self.kept.value = None

    def matches(self, size: int, device: torch.device, channels_last: bool) -> bool:
        """Whether starting from the kept output gives the whole model's features (a random batch)."""
        probe = check_batch(size, device, channels_last)
        with torch.inference_mode():
            whole, kept = self.features_keeping(probe)
            if kept is None:
                return False
            resumed = self.features_from(kept)
            self.image_shape, self.image_channels_last = tuple(kept.shape[1:]), _channels_last(kept[0])
        return resumed.shape == whole.shape and torch.allclose(resumed, whole, rtol=1e-5, atol=1e-6)


class FrozenPrefix:
    """The frozen layers' output per image (by file identity), in memory up to `budget_bytes`, on the CPU.

    Valid for one stage of one run: the frozen modules must keep their weights and statistics (training
    keeps them in eval mode and out of the optimizer; an EMA of constant weights is the same weights)."""

    def __init__(self, model: nn.Module, budget_bytes: int, frozen: list[nn.Parameter] | None = None,
                 store: FeatureCache | None = None):
        # `frozen`: the parameters the full stage will freeze, before it has (the probe's pass keeps outputs).
        self.names = frozen_module_names(model, frozen)
        self.budget, self.used = budget_bytes, 0
        self.outputs: dict[str, torch.Tensor] = {}
        self.usable: bool | None = None  # decided by the first split's check
        self.kept_images = self.resumed_images = 0
        # On disk: one flattened row per image (in the layout it is kept in), keyed by the model, its
        # preprocessing and these layers' names (pipeline.frozen_output_store).
        self.store = store
        self.looked_up: set[str] = set()  # identities already looked for in the store
        self.stored: set[str] = set()  # identities the store holds (read from it or written to it)
        self.image_shape: tuple[int, ...] | None = None  # one image's output, from the first split's check
        self.image_channels_last = False
        self.read_images = self.written_images = 0
        # While True, write_new leaves the store alone (the outputs stay in memory): a candidate image
        # size is measured before the run knows whether it will read this size's outputs again.
        self.holding_writes = False

    def __bool__(self) -> bool:
        return bool(self.names) and self.budget > 0 and self.usable is not False

    def split(self, eval_model: nn.Module, size: int, channels_last: bool) -> PrefixSplit | None:
        """A split of `eval_model` (an eval-mode copy of the trained model), or None when unusable."""
        if not self:
            return None
        try:
            split = PrefixSplit(eval_model, self.names)
        except (AttributeError, RuntimeError, TypeError):  # a tree the names do not fit
            self.usable = False
            return None
        if self.usable is None:
            self.usable = split.matches(size, next(eval_model.parameters()).device, channels_last)
            self.image_shape, self.image_channels_last = split.image_shape, split.image_channels_last
        return split if self.usable else None

    def read_stored(self, identities: list[str]) -> None:
        """Keep the stored outputs of those of `identities` not held yet (after a split: the shape is known)."""
        from .features import FeaturesOnDisk

        wanted = [i for i in dict.fromkeys(identities) if i not in self.outputs and i not in self.looked_up]
        if not (self.store and self.usable and self.image_shape and wanted):
            return
        self.looked_up.update(wanted)
        found, files, file_of, row_of = self.store.locate(0, 0, wanted)
        dim = int(np.prod(self.image_shape))
        if not found:
            return
        rows = FeaturesOnDisk(files, file_of[None], row_of[None], dim)
        for start in range(0, len(found), 64):
            block = np.arange(start, min(start + 64, len(found)))
            flat = torch.from_numpy(rows.rows(np.zeros(len(block), np.int64), block))
            names = [wanted[found[j]] for j in block]
            self.keep(names, self._unflattened(flat))
            self.stored.update(names)
            self.read_images += len(names)

    def write_new(self, identities: list[str]) -> None:
        """Write the outputs held for `identities` that the store does not have yet."""
        new = [i for i in dict.fromkeys(identities) if i in self.outputs and i not in self.stored]
        if not (self.store and self.image_shape and new) or self.holding_writes:
            return
        dim = int(np.prod(self.image_shape))
        writer = None
        try:
            writer = self.store.new_part(0, 0, len(new), dim)
            for start in range(0, len(new), 64):
                names = new[start : start + 64]
                writer.write(list(range(start, start + len(names))), names,
                             self._flattened(torch.stack([self.outputs[i] for i in names])).numpy())
            writer.finish()
        except OSError as exc:
            # A full disk or a cache folder that cannot be written: the run goes on from memory, as without
            # a store, and later runs compute these outputs again.
            if writer is not None:
                writer.discard()
            print(f"warning: could not keep the frozen layers' output in {self.store.directory} "
                  f"({exc.strerror or exc}); this run is unaffected, later runs compute it again",
                  file=sys.stderr)
            self.store = None
            return
        except BaseException:
            if writer is not None:
                writer.discard()
            raise
        self.stored.update(new)
        self.written_images += len(new)

    def _flattened(self, outputs: torch.Tensor) -> torch.Tensor:
        # Channels-last outputs are written in that order (H, W, C), so reading them back needs no transpose.
        return (outputs.permute(0, 2, 3, 1) if self.image_channels_last else outputs).reshape(len(outputs), -1)

    def _unflattened(self, rows: torch.Tensor) -> torch.Tensor:
        c, h, w = self.image_shape
        if self.image_channels_last:
            return rows.view(len(rows), h, w, c).permute(0, 3, 1, 2)
        return rows.view(len(rows), c, h, w)

    def has(self, identity: str) -> bool:
        return identity in self.outputs

    def keep_only(self, identities: set[str]) -> None:
        """Drop the outputs of images no later pass will read."""
        for identity in [i for i in self.outputs if i not in identities]:
            output = self.outputs.pop(identity)
            self.used -= output.numel() * output.element_size()
            self.kept_images -= 1

    def keep(self, identities: list[str], outputs: torch.Tensor) -> None:
        """Keep each image's output while the budget lasts (the images past it are computed each time)."""
        per_image = outputs[0].numel() * outputs.element_size() if len(outputs) else 0
        for identity, output in zip(identities, outputs.cpu()):
            if identity in self.outputs or self.used + per_image > self.budget:
                continue
            self.outputs[identity] = output.clone()
            self.used += per_image
            self.kept_images += 1

    def batch(self, identities: list[str], device: torch.device) -> torch.Tensor:
        first = self.outputs[identities[0]]
        batch = torch.empty((len(identities), *first.shape), dtype=first.dtype,
                            memory_format=torch.channels_last if first.ndim == 3 and _channels_last(first)
                            else torch.contiguous_format)
        for row, identity in zip(batch, identities):
            row.copy_(self.outputs[identity])
        self.resumed_images += len(identities)
        return batch.to(device, non_blocking=True)


def _channels_last(image: torch.Tensor) -> bool:
    """Whether a [C, H, W] tensor is laid out channels-last (C the fastest dimension)."""
    return image.stride(0) == 1 and image.shape[0] > 1
