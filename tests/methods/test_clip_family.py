"""The CLIP family adapters: decision rules, vocabularies and windows on the tiny model."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ovseg_bench.methods.clip_dense import dense_features
from ovseg_bench.methods.base import DatasetInfo, Vocabulary, WeightsOptions
from ovseg_bench.methods.clip_family import (class_probabilities, constant_plane_labels, load_method_config,
                                             synonym_max, threshold_labels)
from ovseg_bench.methods.pamr import PAMR, SCLIP_PAMR
from ovseg_bench.methods.prompts import encode_names
from ovseg_bench.registry import get_method

TINY = str(Path(__file__).parents[1] / "assets" / "tiny_vit.json")
FAMILY = ("clip", "maskclip", "sclip", "clearclip", "naclip")


def _method(name: str):
    return get_method(name)(WeightsOptions(model=TINY, pretrained="none"), torch.device("cpu"))


def _vocab(query_class: list[int], num_classes: int) -> Vocabulary:
    return Vocabulary(torch.zeros(len(query_class), 4), torch.tensor(query_class), num_classes)


def test_synonym_max_takes_each_class_maximum():
    values = torch.tensor([1.0, 5.0, 2.0, 3.0]).view(4, 1, 1)
    out = synonym_max(values, _vocab([0, 0, 1, 2], 3))
    assert out.flatten().tolist() == [5.0, 2.0, 3.0]


def test_class_probabilities_softmax_over_names_then_max():
    scores = torch.tensor([0.2, 0.3, 0.1]).view(3, 1, 1)
    probs = class_probabilities(scores, _vocab([0, 1, 1], 2), 40.0)
    expected = torch.softmax(scores.flatten() * 40.0, dim=0)
    assert torch.allclose(probs.flatten(), torch.stack([expected[0], expected[1:].max()]))


def test_prob_thd_is_strict_and_sends_pixels_to_background():
    probs = torch.tensor([[[0.2, 0.6, 0.45]], [[0.8, 0.4, 0.55]]])
    labels = threshold_labels(probs, area_thd=0.0, prob_thd=0.6)
    # max probs 0.8 (kept), 0.6 (equal: kept), 0.55 (< 0.6: background)
    assert labels.flatten().tolist() == [1, 0, 0]
    assert threshold_labels(probs, area_thd=0.0, prob_thd=0.0).flatten().tolist() == [1, 0, 1]


def test_area_thd_moves_small_classes_to_their_next_best_class():
    # 10 pixels: class 1 wins 9, class 2 wins 1 (area 1 <= 0.1 * 10 foreground pixels -> suppressed)
    probs = torch.zeros(3, 1, 10)
    probs[1, 0, :9], probs[0, 0, :9] = 0.9, 0.1
    probs[2, 0, 9], probs[1, 0, 9], probs[0, 0, 9] = 0.6, 0.3, 0.1
    labels = threshold_labels(probs, area_thd=0.1, prob_thd=0.0)
    assert labels.flatten().tolist() == [1] * 10  # next best is class 1, not background
    # prob_thd then applies to the modified maxima: 0.3 < 0.5 sends the moved pixel to background
    assert threshold_labels(probs, area_thd=0.1, prob_thd=0.5).flatten().tolist() == [1] * 9 + [0]
    # equality suppresses; strictly above keeps
    assert threshold_labels(probs, area_thd=0.099, prob_thd=0.0).flatten().tolist() == [1] * 9 + [2]


def test_constant_plane_is_class_zero_and_ties_go_to_the_lower_index():
    fg = torch.tensor([[[0.3, 0.5, 0.4]], [[0.2, 0.45, 0.4]]])  # classes 1 and 2
    labels = constant_plane_labels(fg, _vocab([1, 2], 3), 0.4)
    assert labels.flatten().tolist() == [0, 1, 0]  # 0.4 vs 0.4 ties resolve to background


@pytest.mark.parametrize("name", FAMILY)
def test_forward_windows_shape_and_finite(name):
    method = _method(name)
    info = DatasetInfo("voc", ("background", "cat", "dog"), True)
    vocab = method.encode_classes([["background"], ["cat", "kitten"], ["dog"]], info)
    windows = torch.randn(2, 3, 70, 90)
    scores = method.forward_windows(windows, vocab)
    assert scores.shape == (2, vocab.embeddings.shape[0], 70, 90)
    assert torch.isfinite(scores).all()
    labels = method.postprocess(scores[0], windows[0], vocab, info)
    assert labels.shape == (70, 90) and labels.dtype == torch.long and int(labels.max()) < 3


def test_constant_rule_scores_foreground_only():
    method = _method("clip")
    method.config = dataclasses.replace(method.config, background="constant", bg_value=0.4)
    info = DatasetInfo("voc", ("background", "cat", "dog"), True)
    vocab = method.encode_classes([["sky", "wall"], ["cat"], ["dog"]], info)
    assert vocab.query_class.tolist() == [1, 2]


def test_synonyms_expand_queries_in_label_order():
    method = _method("sclip")
    info = DatasetInfo("demo", ("background", "person", "cat"), True)
    vocab = method.encode_classes([["sky", "wall"], ["person"], ["cat", "kitty"]], info)
    assert vocab.query_class.tolist() == [0, 0, 1, 2, 2]
    assert torch.allclose(vocab.embeddings.norm(dim=-1), torch.ones(5))


def test_clearclip_pads_windows_to_the_patch_size_and_cuts_back():
    method = _method("clearclip")
    info = DatasetInfo("voc20", ("cat", "dog"), False)
    vocab = method.encode_classes([["cat"], ["dog"]], info)
    window = torch.randn(1, 3, 40, 50)
    scores = method.forward_windows(window, vocab)
    padded = F.pad(window, (7, 7, 4, 4))  # to 48x64: left = pad // 2, right = the rest
    feats = F.normalize(dense_features(method.model.visual, padded, "clearclip"), dim=1)
    cos = F.interpolate(torch.einsum("bchw,qc->bqhw", feats, vocab.embeddings), size=(48, 64),
                        mode="bilinear", align_corners=False)
    assert torch.allclose(scores, cos[:, :, 4:44, 7:57], atol=1e-6)


def test_naclip_refines_full_resolution_cosines_with_pamr():
    method = _method("naclip")
    info = DatasetInfo("voc20", ("cat", "dog"), False)
    vocab = method.encode_classes([["cat"], ["dog"]], info)
    scores, image = torch.randn(2, 30, 40), torch.randn(3, 15, 20)
    guide = F.interpolate(image[None], size=(30, 40), mode="bilinear", align_corners=False)
    refined = PAMR(**SCLIP_PAMR)(guide, scores[None])[0]
    expected = class_probabilities(refined, vocab, 40.0).argmax(dim=0)
    assert torch.equal(method.postprocess(scores, image, vocab, info), expected)


class _FakeText:
    def encode_text(self, tokens):
        return tokens[:, :2].float()  # template i of name n -> a vector we know


def test_template_averaging_orders():
    tokens = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    tokenizer = lambda texts: tokens[: len(texts)]  # noqa: E731
    raw = encode_names(_FakeText(), tokenizer, ["x"], ("a {}", "b {}"), "raw", "cpu")
    norm = encode_names(_FakeText(), tokenizer, ["x"], ("a {}", "b {}"), "normalised", "cpu")
    assert torch.allclose(raw[0], F.normalize(torch.tensor([2.0, 2.0]), dim=0))
    assert torch.allclose(norm[0], F.normalize(torch.tensor([0.8, 0.4]), dim=0))


def test_method_configs_hold_the_published_per_dataset_knobs():
    sclip = load_method_config("sclip")
    assert (sclip.knob("logit_scale", "voc"), sclip.knob("prob_thd", "voc"), sclip.knob("area_thd", "voc")) == (65, 0.1, 0.1)
    assert sclip.knob("logit_scale", "ade20k") == 40
    assert load_method_config("clearclip").knob("prob_thd", "coco_object") == 0.4
    assert load_method_config("naclip").pamr == "sclip"
    assert load_method_config("maskclip").templates == "maskclip85"
