"""Every registered DenseFeatureMethod: one embedding scores any vocabulary exactly as a full
forward pass does (what sharing work between paired datasets relies on)."""
from __future__ import annotations

import pytest
import torch

from ovseg_bench.methods.base import (DatasetInfo, DenseFeatureMethod, ImageLabelMethod, LabelMethod, MethodInputs,
                                      WeightsOptions)
from ovseg_bench.registry import get_method, method_names
from tests.conftest import TINY_MODEL
from tests.methods.test_tcl import random_state

VOC = DatasetInfo("voc", ("background", "cat", "dog"), True)
ADE = DatasetInfo("ade20k", ("wall", "floor", "sky", "tree"), False)


@pytest.fixture(scope="module")
def tcl_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tcl") / "tcl_tiny.pth"
    torch.save({"model": random_state()}, path)
    return path


def shipped_methods() -> list[str]:
    """Registered methods, less the stand-ins other tests register (defined under tests/)."""
    return [name for name in method_names() if not get_method(name).__module__.startswith("tests")]


def dense_methods() -> list[str]:
    return [name for name in shipped_methods() if issubclass(get_method(name), DenseFeatureMethod)]


def test_every_method_of_the_semantic_track_has_a_known_base():
    for name in shipped_methods():
        cls = get_method(name)
        if "semantic" in cls.tracks:
            assert issubclass(cls, (DenseFeatureMethod, LabelMethod, ImageLabelMethod)), name
    assert {"clip", "maskclip", "sclip", "clearclip", "naclip", "tcl", "tcl_nopamr"} <= set(dense_methods())


@pytest.fixture(scope="module")
def reco_files(tmp_path_factory):
    from tests.methods.test_reco import write_references, write_tiny_deit

    root = tmp_path_factory.mktemp("reco")
    names = [*VOC.class_names, *ADE.class_names]
    return write_tiny_deit(root / "deit.pth"), write_references(root / "refs.pkl", names)


def build(name: str, tcl_checkpoint, reco_files):
    """Each dense method on tiny random networks of its own kind."""
    if name.startswith("reco"):
        from tests.methods.test_reco import TINY_RN

        deit, refs = reco_files
        return get_method(name)(WeightsOptions(model=TINY_RN, pretrained="none", checkpoint=deit),
                                torch.device("cpu"), inputs=MethodInputs(references=refs))
    weights = WeightsOptions(model=TINY_MODEL, pretrained="none", checkpoint=tcl_checkpoint)
    return get_method(name)(weights, torch.device("cpu"))


@pytest.mark.parametrize("name", dense_methods())
def test_one_embedding_scores_each_vocabulary_as_its_own_forward_pass(name, tcl_checkpoint, reco_files):
    method = build(name, tcl_checkpoint, reco_files)
    windows = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    voc = method.encode_classes([["background"], ["cat"], ["dog"]], VOC)
    ade = method.encode_classes([["wall"], ["floor"], ["sky"], ["tree"]], ADE)
    with torch.inference_mode():
        features = method.embed_windows(windows)
        shared = [method.score(features, vocab, (40, 56)) for vocab in (voc, ade)]
        alone = [method.forward_windows(windows, vocab) for vocab in (voc, ade)]
    for got, want in zip(shared, alone):
        assert got.shape[-2:] == (40, 56)
        assert torch.equal(got, want)
    assert shared[0].shape[1] != shared[1].shape[1]  # the two vocabularies really differ
