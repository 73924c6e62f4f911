"""`data prepare` on small raw inputs in each source format, then `data check --deep` and a run.

Raw inputs are written here in the published formats (a PASCAL in Detail ``trainval_merged.json``
with RLE masks, raw COCO stuffthingmaps, Cityscapes polygon JSONs and label-id PNGs, tar and
zip archives with the published member layout); expected labels are spelled out from the rules
of the published converters (MMSegmentation's pascal_context, coco_stuff164k and cityscapes
converters, TCL's convert_coco_object.py). Downloads are served from a local ``file://`` path or a
127.0.0.1 HTTP server in a thread; nothing leaves the machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_bench.datasets import download as dl
from ovseg_bench.datasets import prepare
from ovseg_bench.datasets.cards import load_card
from ovseg_bench.datasets.check import GT_MANIFEST_NAME, check_dataset, read_gt_manifest
from ovseg_bench.datasets.converters import encode_rle
from ovseg_bench.errors import ConfigError, DataError
from tests.conftest import result_jsons, run_argv
from tests.synthetic import smooth_image, voc_palette, write_dataset

RNG = np.random.default_rng(5)


# --------------------------------------------------------------------------- helpers

def _jpeg_bytes(h: int, w: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(RNG, (h, w))).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png_bytes(array: np.ndarray, palette=None) -> bytes:
    image = Image.fromarray(array)
    if palette is not None:
        image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _use_manifest(monkeypatch: pytest.MonkeyPatch, **overrides: dict) -> None:
    """Serve the shipped manifests with some archives' url/size/checksums replaced."""
    real = dl.load_archive_manifest

    def patched(target: str) -> dl.ArchiveManifest:
        manifest = real(target)
        specs = tuple(dataclasses.replace(s, **overrides.get(s.name, {})) for s in manifest.archives)
        return dataclasses.replace(manifest, archives=specs)

    monkeypatch.setattr(prepare, "load_archive_manifest", patched)


def _label(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def _prepare(cli, *argv) -> tuple[int, str, str]:
    return cli("data", "prepare", *map(str, argv), "--quiet")


# --------------------------------------------------------------------------- Pascal Context

CONTEXT_IMAGES = {  # stem: (height, width, phase)
    "2008_000002": (24, 32, "val"),
    "2008_000007": (30, 20, "val"),
    "2008_000011": (16, 16, "train"),
}


def _context_json() -> dict:
    """Detail JSON: overlapping annotations of listed and unlisted categories, interleaved images."""
    def ann(image: int, category: int, rows: slice, cols: slice) -> dict:
        h, w = list(CONTEXT_IMAGES.values())[image - 1][:2]
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[rows, cols] = 1
        return {"image_id": image, "category_id": category, "segmentation": encode_rle(mask), "iscrowd": 0}

    anns = [ann(1, 2, slice(0, 24), slice(0, 16)),     # aeroplane
            ann(1, 19, slice(8, 16), slice(8, 32)),     # 19 (bird) over it
            ann(2, 104, slice(0, 30), slice(0, 20)),    # 104 covers image 2
            ann(1, 7, slice(0, 4), slice(0, 32)),       # unlisted 7 over the top rows -> background
            ann(2, 500, slice(10, 20), slice(5, 15)),   # unlisted 500 -> background
            ann(3, 9, slice(0, 16), slice(0, 16)),      # train image: bag everywhere
            ann(1, 458, slice(20, 24), slice(28, 32))]  # the last class in a corner
    for k, a in enumerate(anns):
        a["id"] = 100 + k
    images = [{"image_id": k + 1, "file_name": f"{stem}.jpg", "height": h, "width": w, "phase": phase}
              for k, (stem, (h, w, phase)) in enumerate(CONTEXT_IMAGES.items())]
    images.append({"image_id": 9, "file_name": "2010_999999.jpg", "height": 5, "width": 5, "phase": "test"})
    return {"info": {}, "images": images, "annos_segmentation": anns, "categories": [], "parts": []}


def _context_expected() -> dict[str, np.ndarray]:
    # Ranks in the sorted 60-id list: 2 -> 1, 9 -> 2, 19 -> 4, 104 -> 21, 458 -> 59.
    first = np.zeros((24, 32), dtype=np.uint8)
    first[:, :16] = 1
    first[8:16, 8:32] = 4
    first[0:4, :] = 0
    first[20:24, 28:32] = 59
    second = np.full((30, 20), 21, dtype=np.uint8)
    second[10:20, 5:15] = 0
    return {"2008_000002": first, "2008_000007": second, "2008_000011": np.full((16, 16), 2, dtype=np.uint8)}


def _context_archives(folder: Path) -> tuple[Path, Path]:
    members = {f"VOCdevkit/VOC2010/JPEGImages/{stem}.jpg": _jpeg_bytes(h, w)
               for stem, (h, w, _) in CONTEXT_IMAGES.items()}
    members["VOCdevkit/VOC2010/Annotations/2008_000002.xml"] = b"<annotation/>"  # not needed: not extracted
    tar = _tar(folder / "VOCtrainval_03-May-2010.tar", members)
    detail = folder / "trainval_merged.json"
    detail.write_text(json.dumps(_context_json()), encoding="utf-8")
    return tar, detail


def test_context_from_archives_then_check_and_run(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tar, detail = _context_archives(tmp_path)
    _use_manifest(monkeypatch, **{tar.name: {"md5": _md5(tar)}, detail.name: {"md5": _md5(detail)}})
    data = tmp_path / "data"
    code, stdout, stderr = _prepare(cli, "context", "--data-root", data, "--from-archive", tar,
                                    "--from-archive", detail, "--workers", 2)
    assert code == 0, stderr + stdout
    voc2010 = data / "VOCdevkit/VOC2010"
    for stem, expected in _context_expected().items():
        assert np.array_equal(_label(voc2010 / "SegmentationClassContext" / f"{stem}.png"), expected), stem
    splits = voc2010 / "ImageSets/SegmentationContext"
    assert (splits / "val.txt").read_text() == "2008_000002\n2008_000007\n"
    assert (splits / "train.txt").read_text() == "2008_000011\n"
    assert not (voc2010 / "Annotations").exists() and (voc2010 / "trainval_merged.json").is_file()
    assert "2 annotations of 2 Detail categories outside the 59 classes (ids 7, 500)" in stdout
    report = json.loads((voc2010 / prepare.REPORT_NAME).read_text())["targets"]["context"]
    assert report["conversion"]["unlisted_categories"] == {"7": 1, "500": 1}
    assert {a["name"]: a["verified"] for a in report["archives"]} == {tar.name: "md5", detail.name: "md5"}
    assert set(read_gt_manifest(voc2010 / GT_MANIFEST_NAME)) == {"context", "context59"}
    for name in ("context", "context59"):
        checked = check_dataset(load_card(name), data, num_expected=2, deep=True)
        assert checked.ok and checked.problems == [], checked.problems
    out = tmp_path / "runs"
    code, _, stderr = cli(*run_argv("maskclip", "context59", out, data_root=data))
    assert code == 0, stderr
    assert len(result_jsons(out)) == 1

    # A second prepare checks and skips; a damaged output is rewritten, the others kept.
    label_path = voc2010 / "SegmentationClassContext/2008_000007.png"
    mtime = label_path.stat().st_mtime_ns
    code, stdout, _ = _prepare(cli, "context", "--data-root", data, "--workers", 1)
    assert code == 0 and "up to date" in stdout and label_path.stat().st_mtime_ns == mtime
    Image.fromarray(np.zeros((30, 20), dtype=np.uint8)).save(label_path)
    code, stdout, _ = _prepare(cli, "context", "--data-root", data, "--workers", 1)
    assert code == 0 and "converted 5 files: 1 written, 4 already identical and kept" in stdout
    assert np.array_equal(_label(label_path), _context_expected()["2008_000007"])


def test_context_already_converted_does_not_fetch_the_annotation_file(cli, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A converted tree without trainval_merged.json is checked, not downloaded into again."""
    tar, detail = _context_archives(tmp_path)
    _use_manifest(monkeypatch, **{tar.name: {"md5": _md5(tar)}, detail.name: {"md5": _md5(detail)}})
    data = tmp_path / "data"
    code, stdout, stderr = _prepare(cli, "context", "--data-root", data, "--from-archive", tar,
                                    "--from-archive", detail, "--workers", 1)
    assert code == 0, stderr + stdout
    voc2010 = data / "VOCdevkit/VOC2010"
    (voc2010 / "trainval_merged.json").unlink()  # e.g. removed to save space, or converted by mmseg
    fetched: list[str] = []

    def no_download(spec, *args, **kwargs):
        fetched.append(spec.name)
        raise DataError(f"offline: {spec.name} must not be downloaded here")

    monkeypatch.setattr(prepare, "download", no_download)
    code, stdout, stderr = _prepare(cli, "context", "--data-root", data, "--workers", 1)
    assert code == 0 and fetched == [], stderr + stdout
    assert "trainval_merged.json not fetched: the files converted from it are already complete" in stdout
    assert "raw annotations absent: checked the converted files already there" in stdout

    # One label missing: the conversion is incomplete, so the annotation file is needed again.
    (voc2010 / "SegmentationClassContext/2008_000011.png").unlink()
    code, _, stderr = _prepare(cli, "context", "--data-root", data, "--workers", 1)
    assert code == 2 and fetched == ["trainval_merged.json"] and "offline" in stderr


# --------------------------------------------------------------------------- COCO-Stuff / COCO-Object

# Raw values: person, unused 11, toothbrush (last thing), unused 90, banner (first stuff), wood (last stuff),
# unlabelled, a value outside the table. Each row of the 6 x 8 maps repeats them.
COCO_RAW = [0, 11, 89, 90, 91, 181, 255, 200]
COCO_STUFF = [0, 255, 79, 255, 80, 170, 255, 255]
COCO_OBJECT = [1, 0, 80, 0, 0, 0, 0, 0]


def test_coco_raw_maps_in_place_convert_to_both_benchmarks(cli, tmp_path: Path) -> None:
    root = tmp_path / "coco_stuff164k"
    ids = ["000000000139", "000000000285"]
    for image_id in ids:
        (root / "images/val2017").mkdir(parents=True, exist_ok=True)
        (root / "images/val2017" / f"{image_id}.jpg").write_bytes(_jpeg_bytes(6, 8))
        (root / "annotations/val2017").mkdir(parents=True, exist_ok=True)
        raw = np.array([COCO_RAW] * 6, dtype=np.uint8)
        (root / "annotations/val2017" / f"{image_id}.png").write_bytes(_png_bytes(raw))
    code, stdout, stderr = _prepare(cli, "coco_stuff", "coco_object", "--data-root", tmp_path, "--workers", 1)
    assert code == 0, stderr + stdout
    assert "2 raw maps hold values the published maps never hold (11, 90, 200)" in stdout
    for image_id in ids:
        stuff = _label(root / "annotations/val2017" / f"{image_id}_labelTrainIds.png")
        obj = _label(root / "annotations/val2017" / f"{image_id}_instanceTrainIds.png")
        assert stuff.tolist() == [COCO_STUFF] * 6 and obj.tolist() == [COCO_OBJECT] * 6
        assert _label(root / "annotations/val2017" / f"{image_id}.png").tolist() == [COCO_RAW] * 6  # raw kept
    report = json.loads((root / prepare.REPORT_NAME).read_text())["targets"]
    assert set(report) == {"coco_stuff", "coco_object"} and report["coco_stuff"]["archives"] == []
    for name in ("coco_stuff", "coco_object"):
        assert check_dataset(load_card(name), tmp_path, num_expected=2, deep=True).ok


# --------------------------------------------------------------------------- Cityscapes

def _box(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


CITY_POLYGONS = {"imgWidth": 8, "imgHeight": 6, "objects": [
    {"label": "road", "polygon": _box(0, 3, 7, 5)},
    {"label": "building", "polygon": _box(0, 0, 7, 2)},
    {"label": "car", "polygon": _box(2, 1, 5, 4)},                   # over road and building
    {"label": "license plate", "polygon": _box(3, 3, 4, 3)},          # never drawn
    {"label": "ego vehicle", "polygon": _box(0, 5, 7, 5)},            # void, 255 over the road
]}
CITY_EXPECTED = np.array([[2, 2, 2, 2, 2, 2, 2, 2],
                          [2, 2, 13, 13, 13, 13, 2, 2],
                          [2, 2, 13, 13, 13, 13, 2, 2],
                          [0, 0, 13, 13, 13, 13, 0, 0],
                          [0, 0, 13, 13, 13, 13, 0, 0],
                          [255] * 8], dtype=np.uint8)
CITY_LABEL_IDS = np.array([[7, 8, 26, 24, 0, 1, 33, 9]] * 6, dtype=np.uint8)
CITY_LABEL_IDS_EXPECTED = [[0, 1, 13, 11, 255, 255, 18, 255]] * 6


def _cityscapes_archives(folder: Path) -> tuple[Path, Path]:
    a, b = "frankfurt/frankfurt_000000_000294", "lindau/lindau_000001_000019"
    gt = _zip(folder / "gtFine_trainvaltest.zip", {
        f"gtFine/val/{a}_gtFine_polygons.json": json.dumps(CITY_POLYGONS).encode(),
        f"gtFine/val/{a}_gtFine_labelIds.png": _png_bytes(np.zeros((6, 8), dtype=np.uint8)),  # polygons win
        f"gtFine/val/{b}_gtFine_labelIds.png": _png_bytes(CITY_LABEL_IDS),                  # no polygons
        "gtFine/train/aachen/aachen_000000_000019_gtFine_polygons.json": b"{}",             # not extracted
        "license.txt": b"terms",
    })
    images = _zip(folder / "leftImg8bit_trainvaltest.zip", {
        f"leftImg8bit/val/{stem}_leftImg8bit.png": _png_bytes(smooth_image(RNG, (6, 8))) for stem in (a, b)})
    return gt, images


def test_cityscapes_from_hand_fetched_zips(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gt, images = _cityscapes_archives(tmp_path)
    _use_manifest(monkeypatch)  # the real manifest: no checksum known for these packages
    code, stdout, stderr = _prepare(cli, "cityscapes", "--data-root", tmp_path / "data",
                                    "--from-archive", gt, "--from-archive", images, "--workers", 1)
    assert code == 0, stderr + stdout
    val = tmp_path / "data/cityscapes/gtFine/val"
    assert np.array_equal(_label(val / "frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"), CITY_EXPECTED)
    assert _label(val / "lindau/lindau_000001_000019_gtFine_labelTrainIds.png").tolist() == CITY_LABEL_IDS_EXPECTED
    assert not (tmp_path / "data/cityscapes/gtFine/train").exists()
    assert "1 of 2 Cityscapes GT files were remapped from _gtFine_labelIds.png" in stdout
    assert "has no published checksum here" in stdout
    report = json.loads((tmp_path / "data/cityscapes" / prepare.REPORT_NAME).read_text())["targets"]["cityscapes"]
    assert report["conversion"]["gt_source"] == {"polygons": 1, "label_ids": 1}
    assert all(a["verified"].startswith("unknown") and len(a["sha256"]) == 64 for a in report["archives"])
    assert check_dataset(load_card("cityscapes"), tmp_path / "data", num_expected=2, deep=True).ok


def test_cityscapes_without_archives_says_how_to_get_them(cli, tmp_path: Path) -> None:
    code, _, stderr = _prepare(cli, "cityscapes", "--data-root", tmp_path)
    assert code == 2
    assert "gtFine_trainvaltest.zip" in stderr and "--from-archive" in stderr
    assert "cityscapes-dataset.com" in stderr and "login" in stderr


# --------------------------------------------------------------------------- VOC and ADE20K: verify and place

def test_voc_downloaded_from_a_url_and_ade_moved_into_place(cli, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "src"
    ids = write_dataset("voc", source)
    voc = source / "VOCdevkit/VOC2012"
    members = {f"VOCdevkit/VOC2012/{p.relative_to(voc).as_posix()}": p.read_bytes()
               for p in sorted(voc.rglob("*")) if p.is_file()}
    tar = _tar(tmp_path / "VOCtrainval_11-May-2012.tar", members)
    _use_manifest(monkeypatch, **{tar.name: {"url": tar.as_uri(), "md5": _md5(tar), "size": tar.stat().st_size}})
    data = tmp_path / "data"
    write_dataset("ade20k", tmp_path / "elsewhere")
    data.mkdir()
    (tmp_path / "elsewhere/ade/ADEChallengeData2016").rename(data / "ADEChallengeData2016")
    code, stdout, stderr = _prepare(cli, "voc", "ade20k", "--data-root", data, "--workers", 1)
    assert code == 0, stderr + stdout
    assert (data / "downloads" / tar.name).is_file()
    assert f"moved {data / 'ADEChallengeData2016'}" in stdout
    first = data / f"VOCdevkit/VOC2012/SegmentationClass/{ids[0]}.png"
    assert first.read_bytes() == (voc / f"SegmentationClass/{ids[0]}.png").read_bytes()  # placed as published
    assert Image.open(first).getpalette() == list(voc_palette())
    for name in ("voc", "voc20", "ade20k"):
        assert check_dataset(load_card(name), data, num_expected=3, deep=True).ok, name
    report = json.loads((data / "VOCdevkit/VOC2012" / prepare.REPORT_NAME).read_text())["targets"]["voc"]
    assert report["archives"][0]["verified"] == "md5" and report["archives"][0]["from"] == tar.as_uri()


def test_archive_with_a_wrong_checksum_is_refused(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tar = _tar(tmp_path / "ADEChallengeData2016.zip", {"ADEChallengeData2016/images/validation/x.jpg": b"x"})
    _use_manifest(monkeypatch)  # the shipped md5, which this file does not have
    code, _, stderr = _prepare(cli, "ade20k", "--data-root", tmp_path / "data", "--from-archive", tar)
    assert code == 2 and "checksum mismatch" in stderr and "7328b3957e407ddae1d3cbf487f149ef" in stderr
    assert not (tmp_path / "data/ade").exists()


def test_unknown_names_are_refused_with_suggestions(cli, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Did you mean voc"):
        prepare.resolve_targets(["vocc"])
    assert prepare.resolve_targets(["voc20,context59", "all"]) == list(prepare.TARGETS)
    stray = tmp_path / "my_download.zip"
    stray.write_bytes(b"")
    code, _, stderr = _prepare(cli, "voc", "--data-root", tmp_path, "--from-archive", stray)
    assert code == 2 and "VOCtrainval_11-May-2012.tar" in stderr and "not an archive of voc" in stderr


def test_interrupted_extraction_is_not_taken_as_in_place(tmp_path: Path) -> None:
    spec = dl.load_archive_manifest("ade20k").archives[0]
    for path in spec.provides:
        (tmp_path / path).mkdir(parents=True)
    assert prepare._in_place(spec, tmp_path)
    dl.extraction_marker(tmp_path / spec.dest, spec.name).write_text("")
    assert not prepare._in_place(spec, tmp_path)


# --------------------------------------------------------------------------- downloads

class _RangeServer(ThreadingHTTPServer):
    payload = b""
    cut_first = False   # send only half of the first full response, then close the connection
    requests: list


class _Handler(BaseHTTPRequestHandler):
    server: _RangeServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        asked = self.headers.get("Range")
        self.server.requests.append(asked)
        start = int(asked.split("=")[1].rstrip("-")) if asked else 0
        body = self.server.payload[start:]
        self.send_response(206 if asked else 200)
        if asked:
            self.send_header("Content-Range", f"bytes {start}-{len(self.server.payload) - 1}/{len(self.server.payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_first and not asked:
            self.server.cut_first = False
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = _RangeServer(("127.0.0.1", 0), _Handler)
    srv.requests = []
    srv.payload = bytes(RNG.integers(0, 256, 300_000, dtype=np.uint8))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _spec(srv: _RangeServer, **kw) -> dl.ArchiveSpec:
    url = f"http://127.0.0.1:{srv.server_address[1]}/archive.zip"
    return dl.ArchiveSpec(name="archive.zip", url=url, size=len(srv.payload),
                          md5=hashlib.md5(srv.payload).hexdigest(), **kw)


def test_interrupted_download_resumes_with_a_range_request(server: _RangeServer, tmp_path: Path) -> None:
    server.cut_first = True
    spec = _spec(server)
    with pytest.raises(DataError, match="interrupted after 150000 bytes"):
        dl.download(spec, tmp_path, quiet=True, retries=0, timeout=10)
    assert (tmp_path / "archive.zip.part").stat().st_size == 150_000 and not (tmp_path / "archive.zip").exists()
    path, digests = dl.download(spec, tmp_path, quiet=True, retries=0, timeout=10)
    assert server.requests == [None, "bytes=150000-"]
    assert path.read_bytes() == server.payload and digests["md5"] == spec.md5
    assert not (tmp_path / "archive.zip.part").exists()
    assert dl.download(spec, tmp_path, quiet=True)[0] == path and len(server.requests) == 2  # kept, not fetched


def test_retries_resume_by_themselves(server: _RangeServer, tmp_path: Path) -> None:
    server.cut_first = True
    path, _ = dl.download(_spec(server), tmp_path, quiet=True, retries=2, timeout=10, retry_wait=0)
    assert path.read_bytes() == server.payload and server.requests == [None, "bytes=150000-"]


def test_wrong_checksum_is_an_error_and_not_kept(server: _RangeServer, tmp_path: Path) -> None:
    spec = dataclasses.replace(_spec(server), md5="0" * 32)
    with pytest.raises(DataError, match="checksum mismatch for archive.zip: md5 .*, expected 0{32}"):
        dl.download(spec, tmp_path, quiet=True, retries=0, timeout=10)
    assert list(tmp_path.iterdir()) == []


def test_missing_file_on_the_server_is_a_clear_error(server: _RangeServer, tmp_path: Path) -> None:
    spec = dataclasses.replace(_spec(server), url=_spec(server).url.replace("archive.zip", "nope"))
    server.RequestHandlerClass = type("Missing", (_Handler,), {"do_GET": lambda self: self.send_error(404)})
    with pytest.raises(DataError, match="HTTP 404.*by hand"):
        dl.download(spec, tmp_path, quiet=True, retries=0, timeout=10)


# --------------------------------------------------------------------------- extraction safety

@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/ovseg_evil.txt", "a/../../evil.txt"])
def test_extraction_refuses_paths_outside_the_destination(tmp_path: Path, name: str) -> None:
    for archive in (_tar(tmp_path / "x.tar", {"ok.txt": b"1", name: b"2"}),
                    _zip(tmp_path / "x.zip", {"ok.txt": b"1", name: b"2"})):
        dest = tmp_path / "dest"
        with pytest.raises(DataError, match="refusing to extract"):
            dl.extract(archive, dest, quiet=True)
        assert not (dest / "ok.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/ovseg_evil.txt").exists()


def test_extraction_refuses_links_and_honours_include(tmp_path: Path) -> None:
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("keep/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DataError, match="link"):
        dl.extract(archive, tmp_path / "d1", quiet=True)
    archive = _zip(tmp_path / "some.zip", {"keep/a.txt": b"a", "./keep/b.txt": b"b", "drop/c.txt": b"c"})
    assert dl.extract(archive, tmp_path / "d2", include=["keep/"], quiet=True) == 2
    assert sorted(p.name for p in (tmp_path / "d2").rglob("*.txt")) == ["a.txt", "b.txt"]
    assert not dl.extraction_marker(tmp_path / "d2", archive.name).exists()


def test_every_shipped_manifest_loads_and_names_its_cards_layout() -> None:
    for plan in prepare.PLANS.values():
        manifest = dl.load_archive_manifest(plan.manifest)
        assert manifest.archives and all(a.provides for a in manifest.archives)
        for archive in manifest.archives:
            assert (archive.url is None) == (plan.manifest == "cityscapes")  # cityscapes, cityscapes27
            assert archive.md5 is None or len(archive.md5) == 32
        root = load_card(plan.cards[0]).root
        assert any(p.startswith(root) or root.startswith(p) for a in manifest.archives for p in a.provides)
