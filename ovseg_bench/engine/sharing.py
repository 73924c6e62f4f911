"""One batch of windows embedded for several methods, each shared trunk computed once.

Methods whose dense features share leading blocks (the CLIP family's variants differ only from
the last block on) declare them as a :class:`~ovseg_bench.methods.base.Trunk`: a key holding
everything its output depends on, and the function computing it. For every batch the embedder
computes each distinct (trunk key, input normalisation) once and lets every method finish its
own features from it. Only one batch's trunk outputs are alive at a time, so memory does not
grow with the number of methods beyond their final features.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch


class SharedEmbedder:
    """Features of one batch of windows for each of ``methods``; counts the passes it makes."""

    def __init__(self, methods: Sequence[Any]):
        self.methods = list(methods)
        self.trunk_windows = 0   # windows through a trunk, or a whole embedding that shares none
        self.branch_windows = 0  # windows through a method's own part after a shared trunk

    def embed(self, windows: Sequence[torch.Tensor]) -> list[Any]:
        """``windows[i]``: the batch normalised for ``methods[i]`` -> each method's features."""
        size = (windows[0].shape[-2], windows[0].shape[-1])
        computed: dict[Any, Any] = {}
        features = []
        for method, batch in zip(self.methods, windows):
            trunk = method.trunk(size)
            if trunk is None:
                features.append(method.embed_windows(batch))
                self.trunk_windows += len(batch)
                continue
            key = (trunk.key, method.normalisation)
            if key not in computed:
                computed[key] = trunk.compute(batch)
                self.trunk_windows += len(batch)
            features.append(method.embed_from_trunk(computed[key], batch))
            self.branch_windows += len(batch)
        return features


def trunk_groups(methods: Sequence[Any], size: tuple[int, int]) -> list[list[Any]]:
    """``methods`` grouped by the trunk they compute once for windows of ``size``, in order;
    a method without a trunk is a group of its own."""
    groups: dict[Any, list[Any]] = defaultdict(list)
    for position, method in enumerate(methods):
        trunk = method.trunk(size)
        groups[position if trunk is None else (trunk.key, method.normalisation)].append(method)
    return list(groups.values())


def sharing_notes(methods: Sequence[Any], size: tuple[int, int]) -> list[str]:
    """One line per trunk group of windows of ``size``: what is shared, or why a method runs alone."""
    notes = []
    for group in trunk_groups(methods, size):
        names = ", ".join(method.name for method in group)
        trunk = group[0].trunk(size)
        if trunk is None:
            notes.append(f"{names}: no trunk to share (its features are its own from the first block); "
                         "it embeds its windows in a pass of its own")
        elif len(group) == 1:
            notes.append(f"{names}: no other method of this run has its trunk ({trunk.what}, the same weights, "
                         f"{group[0].normalisation.name} normalisation); it embeds its windows in a pass of its own")
        else:
            notes.append(f"{names}: one pass through {trunk.what} per window, then each its own last part")
    return notes
