"""The referring track: one binary mask per referring expression (RefCOCO, RefCOCO+, RefCOCOg).

Cards: :class:`~ovseg_bench.datasets.refer.ReferringCard` (the refer layout). Items: one sample
per sentence, ``<ref_id>_<sent_id>``. Metrics: oIoU = 100 * sum(I) / sum(U), mIoU = 100 * mean of
the per-sample IoU (U = 0 scores 0), precision at IoU 0.5 ... 0.9, from int64 I and U kept per
sample (:class:`~ovseg_bench.engine.metrics.ReferringCounts`).

Images are decoded without applying EXIF orientation: GLCF and LAVT read them with PIL
(Seonghoon-Yu/Zero-shot-RIS@75ff6ed data/dataset_refer_bert.py, yz93/LAVT-RIS@1da0af9 the same)
and COCO's polygons are drawn on the stored pixels.

Scorers, by adapter base:

- :class:`ReferringMethod`: each image embedded once, all its expressions answered together;
  unanswerable samples are left out (``skip``) or scored as empty masks (``empty``), per the
  method's ``unanswered_rule``, and listed in the result either way.
- :class:`SavedMaskMethod`: binary masks the method already has (``predictions``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..datasets.refer import InstancesIndex, ReferringCard, ReferringDataset, ReferringSample, read_referring
from ..engine.metrics import ReferringCounts
from ..engine.runner import EngineOptions, Evaluation, ImageHook, Scorer
from ..errors import ConfigError, DataError
from ..engine.runner import autocast_context
from ..engine.sliding import Canvas, Window, image_windows
from ..imaging import model_input
from ..methods.base import (DatasetInfo, DenseFeatureMethod, Method, ReferringInfo, ReferringMethod, SavedMaskMethod,
                            Vocabulary)
from .base import Track

UNANSWERED_RULES = ("skip", "empty")


def referring_counts(card: Any, method: Method, device: torch.device) -> ReferringCounts:
    """The method's IoU arithmetic: LAVT's float64 by default, GLCF's float32 for GLCF."""
    return ReferringCounts(device=device, arithmetic=getattr(method, "iou_arithmetic", "float64"))


class SavedMaskScorer(Scorer):
    """Masks a :class:`SavedMaskMethod` already has, scored as they are."""

    new_counts = staticmethod(referring_counts)

    def __init__(self, method: SavedMaskMethod, card: ReferringCard, settings: Any, counts: ReferringCounts,
                 options: EngineOptions, device: torch.device, *, on_item: ImageHook | None = None):
        super().__init__(counts, options, on_item=on_item)
        self.method, self.card, self.device = method, card, device

    def push(self, sample: ReferringSample) -> None:
        if sample.error is not None:
            self.handle_error(sample)
            return
        mask = self.method.mask_for(sample.image_id, sample.gt.shape, self.card.name)
        self.score(sample, torch.from_numpy(mask).to(self.device), torch.from_numpy(sample.gt))


class ReferringScorer(Scorer):
    """Samples of one image gathered, then the image embedded once and its expressions answered."""

    new_counts = staticmethod(referring_counts)

    def __init__(self, method: ReferringMethod, card: ReferringCard, settings: Any, counts: ReferringCounts,
                 options: EngineOptions, device: torch.device, *, on_item: ImageHook | None = None):
        super().__init__(counts, options, on_item=on_item)
        if method.unanswered_rule not in UNANSWERED_RULES:
            raise ConfigError(f"method '{method.name}': unanswered_rule '{method.unanswered_rule}' is not one "
                              f"of {UNANSWERED_RULES}")
        self.method, self.device = method, device
        self.info = ReferringInfo(card.name, card.dataset)
        self.pending: list[ReferringSample] = []

    def push(self, sample: ReferringSample) -> None:
        if self.pending and self.pending[0].ref.image_id != sample.ref.image_id:
            self.flush()
        if sample.error is not None:
            self.flush()
            self.handle_error(sample)
            return
        self.pending.append(sample)

    def flush(self) -> None:
        if not self.pending:
            return
        samples, self.pending = self.pending, []
        state = self.method.embed_image(samples[0].image, str(samples[0].ref.image_id), self.info)
        queries = self.method.encode_expressions([s.ref.text for s in samples])
        answers = self.method.masks(state, queries)
        if len(answers) != len(samples):
            raise RuntimeError(f"method '{self.method.name}' answered {len(answers)} of {len(samples)} expressions")
        for sample, mask in zip(samples, answers):
            self._score_answer(sample, mask)

    def _score_answer(self, sample: ReferringSample, mask: torch.Tensor | None) -> None:
        gt = torch.from_numpy(sample.gt)
        if mask is None:
            self.unanswered.append({"image_id": sample.image_id, "at": sample.index,
                                    "rule": self.method.unanswered_rule})
            if self.method.unanswered_rule == "skip":
                self.skipped.append({"image_id": sample.image_id, "reason": "unanswered (method rule: skip)"})
                self.skipped_at.append(sample.index)
                self.processed_ids.append(sample.image_id)
                self._finished += 1
                return
            mask = torch.zeros_like(gt)
        self.score(sample, mask.to(self.device), gt)


class DenseReferringScorer(ReferringScorer):
    """This harness's baseline for dense methods (the CLIP family), not a published protocol: per
    expression, the method's windows scored against [background words, the expression] with the
    method's own background rule, and the pixels labelled as the expression are the mask.

    The background words are SCLIP's background line of its VOC list (wangf3014/SCLIP@b56bd30
    configs/cls_voc21.txt, shipped as the ``sclip`` names of the voc card). Each image's windows
    are embedded once and scored for every expression of the image.
    """

    def __init__(self, method: DenseFeatureMethod, card: ReferringCard, settings: Any, counts: ReferringCounts,
                 options: EngineOptions, device: torch.device, *, on_item: ImageHook | None = None):
        Scorer.__init__(self, counts, options, on_item=on_item)
        self.method, self.device, self.settings = method, device, settings
        self.info = DatasetInfo(card.name, ("background", "expression"), True)
        self.background = method.encode_classes([background_words()], self.info)
        self.pending = []

    def flush(self) -> None:
        if not self.pending:
            return
        samples, self.pending = self.pending, []
        image, windows, features = self._embed(samples[0].image)
        expressions = self.method.encode_classes([[s.ref.text] for s in samples], self.info)
        for index, sample in enumerate(samples):
            vocab = self._pair_vocabulary(expressions, index)
            canvas = Canvas(windows)
            for window, feats in zip(windows, features):
                canvas.add(window, self.method.score(feats, vocab, window.size)[0].float(), tuple(image.shape[-2:]))
            scores = F.interpolate(canvas.average()[None], size=sample.gt.shape, mode="bilinear",
                                   align_corners=False)[0]
            labels = self.method.postprocess(scores, image, vocab, self.info)
            self._score_answer(sample, labels == 1)

    def _embed(self, rgb: np.ndarray) -> tuple[Tensor, list[Window], list[Any]]:
        s = self.settings
        pixels = model_input(np.ascontiguousarray(rgb[..., ::-1]), s.short_side, s.long_side, rule=s.resize,
                             center_crop=s.center_crop, interpolation=s.interpolation)
        image = self.method.normalisation.apply(pixels[None].to(self.device))[0]
        windows = image_windows(*image.shape[-2:], s.mode, s.crop, s.stride)
        with autocast_context(self.device, self.options.precision):
            features = [self.method.embed_windows(image[None, :, w.y1:w.y2, w.x1:w.x2]) for w in windows]
        self.num_windows += len(windows)  # windows through the network: once per image, not per expression
        return image, windows, features

    def _pair_vocabulary(self, expressions: Vocabulary, index: int) -> Vocabulary:
        """Class 0: the background words; class 1: expression ``index``'s queries."""
        bg, ex = self.background, expressions
        rows = (ex.query_class == index).nonzero().flatten()
        embeddings = torch.cat([bg.embeddings, ex.embeddings[rows]])
        query_class = torch.cat([torch.zeros_like(bg.query_class), torch.ones_like(rows)])
        return Vocabulary(embeddings, query_class, 2)


def background_words() -> list[str]:
    """SCLIP's background synonyms (the first line of its VOC-21 list)."""
    from ..datasets.cards import load_card

    return load_card("voc").class_synonyms("sclip")[0]


class ReferringTrack(Track):
    name = "referring"
    metric_id = "referring-iou/int64"
    default_protocol = "tcl"
    console_columns = ("oIoU", "P@0.5", "P@0.9")
    saves_predictions = True  # the chosen mask of every sample, 0/255
    sidecar_layout = "counts[sample, (intersect, union)]"
    scorers = {ReferringMethod: ReferringScorer, SavedMaskMethod: SavedMaskScorer,
               DenseFeatureMethod: DenseReferringScorer}

    def __init__(self) -> None:
        self._indices: dict[tuple[str, str], InstancesIndex] = {}

    def list_items(self, card: ReferringCard, data_root: Path) -> list[Any]:
        refs, index = read_referring(card, data_root)
        if not refs:
            raise DataError(f"{card.name}: {card.refs_json(data_root)} holds no sample of split '{card.split}'")
        self._indices[(card.name, str(Path(data_root).resolve()))] = index  # the reader's GT source
        return refs

    def item_id(self, item: Any) -> str:
        return item.sample_id  # <ref_id>_<sent_id>: one item per sentence, several per image

    def dataset_fields(self, card: ReferringCard, settings: Any, data_root: Path) -> dict[str, Any]:
        return {"dataset": card.dataset, "split_by": card.split_by, "gt_rule": card.gt_rule,
                "num_images": card.num_images}

    def expected_items(self, card: ReferringCard) -> int:
        return card.num_samples

    def first_missing(self, card: ReferringCard, data_root: Path) -> tuple[str, Path] | None:
        pieces = [("data root", Path(data_root)), ("dataset folder", card.root_in(data_root)),
                  ("instances file", card.instances_path(data_root)), ("image folder", card.images_in(data_root))]
        pieces.append(("converted refs (run `ovseg-bench data prepare " + card.dataset + "`)",
                       card.refs_json(data_root)))
        return next(((what, path) for what, path in pieces if not path.exists()), None)

    def reader(self, card: ReferringCard, items: list[Any], settings: Any, data_root: Path) -> ReferringDataset:
        key = (card.name, str(Path(data_root).resolve()))
        index = self._indices.get(key) or read_referring(card, data_root)[1]
        return ReferringDataset(card, items, index, apply_exif=False)

    def result_blocks(self, card: ReferringCard, evaluation: Evaluation, settings: Any) -> dict[str, Any]:
        from ..stats import referring_ci_block

        counts = evaluation.counts
        metrics: dict[str, Any] = counts.compute().as_dict()
        ci = referring_ci_block(counts.per_item.numpy())
        if ci is not None:
            metrics["ci95"] = ci
        totals = counts.additive().cpu()
        return {"metrics": metrics, "counts": {"intersect": [int(totals[0])], "union": [int(totals[1])]}}


REFERRING = ReferringTrack()
