"""Readers of saved CAMs (WeakTr's and CLIP-ES's .npy dicts) and the pseudo-mask rule."""
from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from ovseg_bench.datasets.cams import Cams, load_cams, pseudo_mask, pseudo_masks, read_npy_dict, weaktr_coco_key_labels
from ovseg_bench.errors import DataError
from ovseg_bench.safe_pickle import UnsafePickleError
from tests.label_synthetic import write_clip_es_cams, write_weaktr_cams

H, W = 7, 9


def _maps(rng: np.random.Generator, k: int) -> np.ndarray:
    return rng.random((k, H, W), dtype=np.float32)


def _write_npy_with_pickle(path: Path, payload: bytes) -> Path:
    """An .npy file (format 1.0: magic and header) for a 0-d object array holding ``payload`` (a pickle)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|O", "fortran_order": False, "shape": ()})
    path.write_bytes(buffer.getvalue() + payload)
    return path


# ---------------------------------------------------------------------------------- formats


def test_weaktr_keys_become_labels_plus_one_in_file_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    maps = _maps(rng, 2)
    path = write_weaktr_cams(tmp_path / "a.npy", {14: maps[0], 2: maps[1]})
    cams = load_cams(path, 21)
    assert (cams.classes, cams.source, cams.file_dtype) == ((15, 3), "weaktr", "float32")
    np.testing.assert_array_equal(cams.maps, maps)


def test_clip_es_keys_plus_one_and_float16_maps_exactly(tmp_path: Path) -> None:
    maps = _maps(np.random.default_rng(1), 3).astype(np.float16)
    path = write_clip_es_cams(tmp_path / "b.npy", [7, 0, 19], maps)
    cams = load_cams(path, 21)
    assert (cams.classes, cams.source, cams.file_dtype) == ((8, 1, 20), "clip-es", "float16")
    assert cams.maps.dtype == np.float32
    np.testing.assert_array_equal(cams.maps, maps.astype(np.float32))


def test_weaktr_coco_keys_are_category_ids_minus_one(tmp_path: Path) -> None:
    maps = _maps(np.random.default_rng(2), 2)
    table = weaktr_coco_key_labels()
    # key 89 = id 90 toothbrush = label 80; key 0 = person = label 1
    cams = load_cams(write_weaktr_cams(tmp_path / "c.npy", {0: maps[0], 89: maps[1]}), 81, key_labels=table)
    assert cams.classes == (1, 80)
    with pytest.raises(DataError, match="c2.npy.*key 11"):  # id 12 ('street sign') is unused
        load_cams(write_weaktr_cams(tmp_path / "c2.npy", {11: maps[0]}), 81, key_labels=table)
    with pytest.raises(DataError, match="weaktr_coco_key_labels"):
        load_cams(write_weaktr_cams(tmp_path / "c3.npy", {89: maps[0]}), 81)


def test_protocol_2_and_numpy_1_spellings_load(tmp_path: Path) -> None:
    # Python 2 era np.save: protocol 2, bytes as _codecs.encode, numpy.core module names.
    content = {3: np.full((H, W), 0.25, np.float32)}
    payload = pickle.dumps(np.array(content, dtype=object), protocol=2)
    assert b"_codecs" in payload
    old = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != payload and b"numpy._core" not in old
    for name, data in (("p2.npy", payload), ("np1.npy", old)):
        cams = load_cams(_write_npy_with_pickle(tmp_path / name, data), 21)
        assert cams.classes == (4,) and np.all(cams.maps == 0.25)


# -------------------------------------------------------------------------------- malformed


def _nan_map() -> np.ndarray:
    bad = np.zeros((H, W), np.float32)
    bad[1, 1] = np.nan
    return bad


@pytest.mark.parametrize("content,fragment", [
    ({0: _nan_map()}, "NaN"),
    ({0: np.zeros((H, W), np.float32), 1: np.zeros((H, W + 1), np.float32)}, "differ in size"),
    ({0: np.zeros((H,), np.float32)}, r"\[H, W\]"),
    ({0: np.zeros((H, W), np.int32)}, "floating point"),
    ({"foo": np.zeros((H, W), np.float32)}, "neither"),
    ({"keys": np.array([1]), "attn_highres": np.zeros((1, H, W)), "extra": 1}, "neither"),
    ({"keys": np.array([1, 2]), "attn_highres": np.zeros((1, H, W), np.float16)}, "K = 2"),
    ({"keys": np.array([1.0]), "attn_highres": np.zeros((1, H, W), np.float16)}, "integer"),
    ({"keys": np.array([4, 4]), "attn_highres": np.zeros((2, H, W), np.float16)}, "twice"),
    ({20: np.zeros((H, W), np.float32)}, "label 21, outside 1..20"),
])
def test_malformed_cams_are_named(tmp_path: Path, content: dict, fragment: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, content)
    with pytest.raises(DataError, match=fragment) as info:
        load_cams(path, 21)
    assert str(path) in str(info.value)


def test_plain_arrays_and_non_npy_files_are_named(tmp_path: Path) -> None:
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((2, H, W), np.float32))
    with pytest.raises(DataError, match="plain.npy.*not a saved dict"):
        load_cams(plain, 21)
    text = tmp_path / "text.npy"
    text.write_text("not numpy")
    with pytest.raises(DataError, match="text.npy.*not a readable .npy"):
        load_cams(text, 21)
    with pytest.raises(DataError, match="missing.npy"):
        load_cams(tmp_path / "missing.npy", 21)
    listed = tmp_path / "list.npy"
    np.save(listed, np.array([1, 2], dtype=object))
    with pytest.raises(DataError, match="list.npy"):
        load_cams(listed, 21)


class _Exploit:
    """Pickles as a call of ``os.system``: what ``np.load(allow_pickle=True)`` would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_disallowed_global_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.npy"
    np.save(path, np.array({0: _Exploit(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError, match="system") as info:
        load_cams(path, 21)
    assert str(path) in str(info.value) and not marker.exists()


def test_other_harmless_globals_are_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "ordered.npy"
    np.save(path, np.array(OrderedDict({0: np.zeros((H, W), np.float32)}), dtype=object))
    with pytest.raises(UnsafePickleError, match="OrderedDict"):
        read_npy_dict(path)


def test_codecs_encode_is_limited_to_latin1_bytes(tmp_path: Path) -> None:
    # A hand-made protocol-2 pickle calling _codecs.encode with another codec is refused.
    payload = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R."
    with pytest.raises(DataError, match="latin-1"):
        read_npy_dict(_write_npy_with_pickle(tmp_path / "codec.npy", payload))


# ------------------------------------------------------------------------------ pseudo masks


def _reference_labels(maps: np.ndarray, classes: tuple[int, ...], threshold: float, dtype: np.dtype) -> np.ndarray:
    """Independent: pad a threshold plane (in the maps' dtype) before the maps, argmax, look up."""
    stack = np.concatenate([np.full((1, *maps.shape[1:]), threshold, dtype=dtype), maps.astype(dtype)])
    return np.array([0, *classes], dtype=np.uint8)[np.argmax(stack, axis=0)]


@pytest.mark.parametrize("threshold", [0.3, 0.43, 0.55])
def test_pseudo_mask_matches_an_independent_argmax(tmp_path: Path, threshold: float) -> None:
    rng = np.random.default_rng(3)
    maps = np.round(_maps(rng, 3), 3)  # values on a 0.001 grid: no near-ties with the threshold
    weaktr = load_cams(write_weaktr_cams(tmp_path / "w.npy", {4: maps[0], 0: maps[1], 11: maps[2]}), 21)
    expected = _reference_labels(maps, (5, 1, 12), threshold, np.float32)
    np.testing.assert_array_equal(pseudo_mask(weaktr, threshold, (H, W)), expected)
    clip = load_cams(write_clip_es_cams(tmp_path / "c.npy", [4, 0, 11], maps), 21)
    expected16 = _reference_labels(maps.astype(np.float16), (5, 1, 12), threshold, np.float16)
    np.testing.assert_array_equal(pseudo_mask(clip, threshold, (H, W)), expected16)


def test_ties_go_to_background_then_to_the_earlier_class() -> None:
    t = 0.43
    maps = np.zeros((2, 1, 3), np.float32)
    maps[:, 0, 0] = np.float32(t)          # both equal the threshold: background
    maps[:, 0, 1] = 0.9                    # two classes tie: the first in file order
    maps[1, 0, 2] = 0.9
    for source in ("weaktr", "clip-es"):
        cams = Cams((7, 3), maps, source, "float32")
        assert pseudo_mask(cams, t, (1, 3)).tolist() == [[0, 7, 3]]


def test_weaktr_softmax_ties_one_ulp_above_the_threshold() -> None:
    # WeakTr's float32 softmax maps t and the next float32 above it to the same probability (0.5),
    # so the argmax stays on background; CLIP-ES's plain argmax picks the class.
    t = 0.43
    just_above = np.nextafter(np.float32(t), np.float32(1))
    maps = np.full((1, 1, 1), just_above, np.float32)
    assert pseudo_mask(Cams((5,), maps, "weaktr", "float32"), t, (1, 1)).item() == 0
    assert pseudo_mask(Cams((5,), maps, "clip-es", "float32"), t, (1, 1)).item() == 5


def test_clip_es_threshold_is_rounded_to_float16_first() -> None:
    # A threshold whose float16 value lies above it: a CAM equal to that float16 ties (background),
    # where a float32 comparison would call it foreground.
    t = next(x / 1000 for x in range(300, 700) if float(np.float16(x / 1000)) > x / 1000)
    maps = np.full((1, 1, 1), np.float16(t), np.float32)
    assert pseudo_mask(Cams((2,), maps, "clip-es", "float16"), t, (1, 1)).item() == 0
    assert pseudo_mask(Cams((2,), maps, "clip-es", "float32"), t, (1, 1)).item() == 2


def test_no_class_is_all_background_and_size_is_checked(tmp_path: Path) -> None:
    empty = load_cams(write_weaktr_cams(tmp_path / "e.npy", {}), 21)
    assert empty.classes == () and not pseudo_mask(empty, 0.4, (3, 4)).any()
    cams = load_cams(write_weaktr_cams(tmp_path / "s.npy", {0: np.zeros((H, W), np.float32)}), 21)
    with pytest.raises(DataError, match=f"{W}x{H}.*{W + 1}x{H}"):
        pseudo_mask(cams, 0.4, (H, W + 1))


def test_pseudo_masks_stack_the_grid(tmp_path: Path) -> None:
    maps = np.round(_maps(np.random.default_rng(4), 2), 3)
    cams = load_cams(write_weaktr_cams(tmp_path / "g.npy", {1: maps[0], 6: maps[1]}), 21)
    grid = (0.3, 0.4, 0.5)
    stacked = pseudo_masks(cams, grid, (H, W))
    assert stacked.shape == (3, H, W) and stacked.dtype == np.uint8
    for k, t in enumerate(grid):
        np.testing.assert_array_equal(stacked[k], pseudo_mask(cams, t, (H, W)))
    # a higher threshold never adds foreground
    assert np.all((stacked[2] > 0) <= (stacked[0] > 0))


def test_saved_cams_read_back_exactly_in_both_formats(tmp_path):
    from ovseg_bench.datasets.cams import Cams, load_cams, save_cams

    maps = np.random.default_rng(0).random((2, 5, 7)).astype(np.float16).astype(np.float32)
    for source, dtype in (("weaktr", "float32"), ("clip-es", "float16")):
        path = tmp_path / f"{source}.npy"
        save_cams(path, Cams((15, 3), maps, source, dtype))
        back = load_cams(path, 21)
        assert back.classes == (15, 3) and back.source == source and back.file_dtype == dtype
        assert np.array_equal(back.maps, maps)
