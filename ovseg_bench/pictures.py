"""Pictures: colour overlays, saved label maps and image | ground truth | prediction panels.

Three outputs, none of which touches a metric:

- ``ovseg-bench predict``: one image, a free vocabulary, a colour overlay with a legend
  (:func:`predict`, :func:`render_overlay`).
- ``run --save-predictions``: ``OUTPUT/predictions/<method>/<dataset>/<image_id>.png``, 8-bit 'L'
  PNGs of the labels at GT size (referring: the chosen mask of each ``<ref_id>_<sent_id>``,
  0/255), exactly what ``--method predictions`` reads back.
- ``run --visualize N``: ``OUTPUT/visualize/<method>__<dataset>/<image_id, '/' -> '__'>.png``
  for the first N images of the split, with a legend of the card's classes found in the GT or
  the prediction (:func:`render_panel`).

Colours are fixed: class k takes the PASCAL VOC bit-palette colour of index k + 1 (so no class
is black or white), and ignored GT pixels (255) are white.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import ConfigError, DataError
from .atomic import atomic_path, check_writable

if TYPE_CHECKING:
    from .methods.base import WeightsOptions

IGNORE = 255
IGNORE_COLOUR = (255, 255, 255)
CAPTION_BACKGROUND = (232, 232, 232)  # grey, so white (ignored) GT pixels do not run into it
OVERLAY_ALPHA = 0.5   # weight of the class colour over the image
MAX_CLASSES = 255     # labels are written as 8-bit PNGs and 255 means "ignored"


# ----------------------------------------------------------------------------- colours

@functools.lru_cache(maxsize=1)
def palette() -> np.ndarray:
    """[256,3] uint8 RGB, read-only: row k is class k's colour, row 255 (ignore) is white.

    Class k gets the VOC bit-palette colour of k + 1: bit 3j+c of the index sets bit 7-j of
    channel c. Index 0 (black) is skipped so the background of an overlay stays visible.
    """
    index = np.arange(1, 256, dtype=np.int64)
    colours = np.zeros((255, 3), dtype=np.int64)
    for j in range(8):
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * j + channel)) & 1) << (7 - j)
    table = np.empty((256, 3), dtype=np.uint8)
    table[:255] = colours
    table[IGNORE] = IGNORE_COLOUR
    table.flags.writeable = False
    return table


def colourise(labels: np.ndarray) -> np.ndarray:
    """HxW integer labels (0..254, 255 = ignore) -> HxWx3 uint8 RGB."""
    return palette()[np.asarray(labels, dtype=np.int64).clip(0, IGNORE)]


def class_shares(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes] float64: fraction of all pixels of ``labels`` given each class."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=num_classes)[:num_classes]
    return counts / max(labels.size, 1)


def format_share(share: float) -> str:
    """A pixel fraction as a percentage with one decimal; ``<0.1%`` rather than ``0.0%`` when present."""
    return "<0.1%" if 0 < share < 0.0005 else f"{100 * share:.1f}%"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font (no font files); scalable where Pillow has FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _font_size(width: int, height: int) -> int:
    """Text scales with the picture: 13 px for small images, up to 28 px for large ones."""
    return int(np.clip(round(min(width, height) / 32), 13, 28))


# ----------------------------------------------------------------------------- overlay

def render_overlay(rgb: np.ndarray, labels: np.ndarray, names: Sequence[str], *,
                   alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The image blended with its class colours, and below it a legend of the classes present.

    ``rgb`` HxWx3 uint8; ``labels`` HxW integers in ``[0, len(names))``. The result is as wide as
    the image (wider only if one legend entry would not fit) and H + legend pixels high.
    """
    height, width = labels.shape
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * colourise(labels).astype(np.float32)
    picture = Image.fromarray(np.rint(blended).astype(np.uint8), "RGB")
    shares = class_shares(labels, len(names))
    present = sorted((k for k in range(len(names)) if shares[k] > 0), key=lambda k: (-shares[k], k))
    entries = [(palette()[k], f"{names[k]} {format_share(shares[k])}") for k in present]
    legend = _legend(entries, width, _font(_font_size(width, height)))
    canvas = Image.new("RGB", (max(width, legend.width), height + legend.height), "white")
    canvas.paste(picture, (0, 0))
    canvas.paste(legend, (0, height))
    return canvas


def _legend(entries: list[tuple[np.ndarray, str]], width: int, font: Any) -> Image.Image:
    """Swatch + text entries in as many equal columns as fit in ``width``, read down each column."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 2)
    line = ascent + descent + 6
    swatch, pad = line - 6, 8
    texts = [probe.textlength(text, font=font) for _, text in entries] or [0]
    column = int(swatch + pad // 2 + max(texts) + 2 * pad)
    columns = max(1, min(len(entries), (width - pad) // column))
    rows = -(-len(entries) // columns)
    legend = Image.new("RGB", (max(width, column + pad), rows * line + 2 * pad - 6), "white")
    draw = ImageDraw.Draw(legend)
    for i, (colour, text) in enumerate(entries):
        x, y = pad + (i // rows) * column, pad + (i % rows) * line
        draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=tuple(int(c) for c in colour), outline="black")
        draw.text((x + swatch + pad // 2, y + (swatch - ascent - descent) // 2), text, fill="black", font=font)
    return legend


# ----------------------------------------------------------------------------- panels

def render_panel(rgb: np.ndarray, gt: np.ndarray, labels: np.ndarray, caption: str, *,
                 names: Sequence[str]) -> Image.Image:
    """image | ground truth | prediction side by side above a two-line caption and a legend.

    ``gt`` and ``labels`` are HxW class indices with the image's size; 255 (ignore) is white.
    ``names`` are the card's class names, label k is ``names[k]``. The panel is 3W wide (wider
    only if one legend entry would not fit) and H + caption + legend pixels high.
    """
    height, width = rgb.shape[:2]
    font = _font(_font_size(width, height))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 2)
    line = ascent + descent + 4
    legend = _legend(panel_entries(gt, labels, names), 3 * width, font)
    legend_top = height + 2 * line + 4
    panel = Image.new("RGB", (max(3 * width, legend.width), legend_top + legend.height), CAPTION_BACKGROUND)
    for column, picture in enumerate((rgb, colourise(gt), colourise(labels))):
        panel.paste(Image.fromarray(np.ascontiguousarray(picture), "RGB"), (column * width, 0))
    draw = ImageDraw.Draw(panel)
    titles = ("image", "ground truth (white: ignored)", "prediction")
    if max(draw.textlength(t, font=font) for t in titles) > width - 8:  # narrow images: short titles
        titles = ("image", "GT", "pred")
    for column, title in enumerate(titles):
        draw.text((column * width + 4, height + 2), title, fill="black", font=font)
    draw.text((4, height + 2 + line), caption, fill="black", font=font)
    panel.paste(legend, (0, legend_top))
    return panel


def panel_entries(gt: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> list[tuple[np.ndarray, str]]:
    """The panel legend: (colour, name) of every value in the GT or the prediction, by index.

    Sorted by value, so 255 (ignored GT, white) comes last, and the same maps give the same legend.
    """
    values = np.union1d(np.asarray(gt).ravel(), np.asarray(labels).ravel()).tolist()
    return [(palette()[value], _value_name(value, names)) for value in values]


def _value_name(value: int, names: Sequence[str]) -> str:
    if value == IGNORE:
        return "ignored"
    # A GT value beyond the card's classes is dropped by the metric (engine/metrics.py) but still
    # coloured in the panel, so it is named rather than left unexplained.
    return names[value] if value < len(names) else f"{value}: not a class"


class _PictureWriter:
    """The run's per-image hook: saves label PNGs and/or panels; holds no image between calls."""

    def __init__(self, output: Path, method: str, card: Any, samples: list[Any], *,
                 save_predictions: bool, visualize: int, save_cams: bool = False):
        self.method, self.dataset, self.samples = method, card.name, samples
        self.cams_dir = Path(output) / "cams" / method / card.name if save_cams else None
        self.names = card.class_names() if hasattr(card, "class_names") else ()  # referring cards have none
        self.labels_dir = Path(output) / "predictions" / method / card.name if save_predictions else None
        self.panels_dir = Path(output) / "visualize" / f"{method}__{card.name}"
        self.visualize = visualize

    def on_cams(self, index: int, image_id: str, cams: Any) -> None:
        """The label-conditioned scorer hands each image's CAMs here (``--save-cams``)."""
        if self.cams_dir is None:
            return
        from .datasets.cams import save_cams

        _check_image_id(image_id)
        save_cams(self.cams_dir / f"{image_id}.npy", cams)

    def __call__(self, index: int, image_id: str, labels: Any, gt: Any) -> None:
        _check_image_id(image_id)
        wanted = index < self.visualize
        if self.labels_dir is None and not wanted:
            return
        label_map = _as_uint8_labels(labels)
        if self.labels_dir is not None:
            save_png(Image.fromarray(label_map, "L"), self.labels_dir / f"{image_id}.png")
        if wanted:
            rgb = read_image(self.samples[index].image_path)[:, :, ::-1]
            caption = f"{self.method} | {self.dataset} | {image_id}"
            panel = render_panel(rgb, gt.cpu().numpy(), label_map, caption, names=self.names)
            save_png(panel, self.panels_dir / f"{image_id.replace('/', '__')}.png")


def make_image_hook(output: Path, method: str, card: Any, samples: list[Any], *,
                    save_predictions: bool, visualize: int, save_cams: bool = False) -> Any:
    """An ``ImageHook`` for ``engine.runner.evaluate`` that writes what the run asked for.

    ``samples`` is the run's sample list (``SampleRef``); the hook's index points into it.
    """
    if visualize < 0:
        raise ConfigError(f"--visualize {visualize}: expected a number of images >= 0")
    return _PictureWriter(output, method, card, samples, save_predictions=save_predictions, visualize=visualize,
                          save_cams=save_cams)


def _as_uint8_labels(labels: Any) -> np.ndarray:
    """[H,W] int64 tensor (any device) -> HxW uint8 array; labels are class indices < 255. A bool
    mask (the referring track) is written 0/255, which ``--method predictions`` reads back."""
    array = labels.cpu().numpy()
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.size and (array.min() < 0 or array.max() > IGNORE):
        raise ValueError(f"labels outside 0..255 ({array.min()}..{array.max()}) cannot be stored as 8-bit PNG")
    return array.astype(np.uint8)


def _check_image_id(image_id: str) -> None:
    parts = Path(image_id).parts
    if Path(image_id).is_absolute() or ".." in parts:
        raise DataError(f"image id '{image_id}' would write outside the output folder; fix the split file")


# ----------------------------------------------------------------------------- files

def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (temp file in the same folder, then rename), creating parents."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def read_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 BGR, decoded like a benchmark image; DataError naming the file otherwise."""
    from .imaging import decode_image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path}: file not found")
    bgr = decode_image(path)
    if bgr is None:
        raise DataError(f"image {path}: not a decodable image (expected JPEG, PNG, BMP, WebP or TIFF)")
    return bgr


# ----------------------------------------------------------------------------- predict

def parse_classes(text: str) -> tuple[tuple[str, ...], ...]:
    """``"cat|kitten,sofa,floor"`` -> (("cat", "kitten"), ("sofa",), ("floor",)).

    Commas separate classes, ``|`` separates synonyms of one class (the first names it).
    """
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ConfigError('--classes is empty; give comma-separated class names, e.g. --classes "cat,sofa,floor"')
    classes = []
    for position, item in enumerate(items, start=1):
        synonyms = tuple(s.strip() for s in item.split("|"))
        if not all(synonyms):
            raise ConfigError(f"--classes {text!r}: class {position} has an empty name; "
                              'write names between commas, synonyms with |, e.g. "cat|kitten,sofa"')
        classes.append(synonyms)
    names = [c[0] for c in classes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--classes names {repeated} more than once; merge them as synonyms with |")
    if len(classes) > MAX_CLASSES:
        raise ConfigError(f"--classes has {len(classes)} classes; at most {MAX_CLASSES} fit an 8-bit label map")
    return tuple(classes)


@dataclasses.dataclass(frozen=True)
class PredictRequest:
    """One ``ovseg-bench predict``: a method, one image, a free vocabulary."""

    method: str
    image: Path
    classes: tuple[tuple[str, ...], ...]   # synonyms per class; label k is classes[k]
    out: Path = Path("overlay.png")
    protocol: str = "tcl"                  # resize and window settings: the preset's defaults
    weights: WeightsOptions | None = None  # --model/--pretrained/--checkpoint; None = the method's defaults
    method_config: Path | None = None
    device: str = "auto"
    precision: str = "fp32"


@dataclasses.dataclass(frozen=True)
class Prediction:
    path: Path
    names: tuple[str, ...]
    shares: tuple[float, ...]    # fraction of the image's pixels per class, in class order
    labels: np.ndarray           # HxW uint8 class indices at the image's size
    weights: dict[str, Any]      # the method's weights record (Method.weights), with its random flag


def predict(request: PredictRequest) -> Prediction:
    """Segment ``request.image`` with ``request.classes`` and write the overlay to ``request.out``.

    A first class named ``background`` is treated as the benchmarks' background class (label 0
    with the method's background rule, as on VOC).
    """
    from .engine.protocol import PRECISIONS, load_protocol, resolve_protocol
    from .engine.runner import autocast_context, resolve_device
    from .tracks.semantic import segment_image
    from .methods.base import WeightsOptions, WindowMethod
    from .registry import get_method

    if not request.classes:
        raise ConfigError('no classes given; use --classes "cat,sofa,floor"')
    if request.precision not in PRECISIONS:
        raise ConfigError(f"--precision '{request.precision}' is not one of {PRECISIONS}")
    _check_out(request.out)
    bgr = read_image(request.image)
    method_cls = get_method(request.method)
    settings = load_protocol(resolve_protocol(request.protocol, method_cls, request.method_config)).settings_for("custom")
    if not issubclass(method_cls, WindowMethod):
        raise ConfigError(f"method '{request.method}' scores existing label maps and cannot segment an image; "
                          "pick a model method (`ovseg-bench list methods`)")
    device = resolve_device(request.device)
    autocast_context(device, request.precision)  # refuse fp16 on the CPU before loading weights
    method = method_cls(request.weights or WeightsOptions(), device, request.method_config)
    classes = [list(synonyms) for synonyms in request.classes]
    labels = segment_image(method, bgr, classes, settings, device, precision=request.precision,
                           background_class=classes[0][0].lower() == "background")
    labels = _as_uint8_labels(labels)
    names = tuple(synonyms[0] for synonyms in request.classes)
    save_png(render_overlay(bgr[:, :, ::-1], labels, names), request.out)
    return Prediction(request.out, names, tuple(class_shares(labels, len(names)).tolist()), labels,
                      method.weights())


def _check_out(out: Path) -> None:
    """Refuse an overlay path that cannot be written, before the (slow) model load."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / 'overlay.png'}")
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the overlay is written as PNG; give a file name ending in .png")
    check_writable(Path(out).absolute().parent, option=f"--out {out}")
