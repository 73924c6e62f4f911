"""Regenerate the coarse demo annotations (and optionally the demo images) of ``datasets/demo``.

The masks are hand-drawn polygons, lines and ellipses whose coordinates are written below as
data, in the pixel frame of the ORIGINAL scikit-image sample (``skimage.data.<name>()``), so
they can be reviewed and edited against that image.  They are scaled to the shipped JPEG's size,
rasterised in list order (a later shape overwrites an earlier one) and finally every pixel
within ``BAND`` pixels of a boundary between two different labels is set to 255 (ignore), as
VOC does, because the hand-drawn outlines are only accurate to a few pixels.

These are COARSE demo annotations made for ovseg-bench; they are not a benchmark.

Usage (from the repository root):

    python datasets/demo/make_masks.py                  # rewrite SegmentationClass/*.png and val.txt
    python datasets/demo/make_masks.py --images         # also re-export JPEGImages/*.jpg (needs scikit-image)
    python datasets/demo/make_masks.py --overlays DIR   # also write image/mask overlays to DIR for review

Writing the masks needs only numpy and Pillow.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
IMG_DIR = HERE / "JPEGImages"
ANN_DIR = HERE / "SegmentationClass"

# Label order; must match ../classnames/mmseg/demo.txt.
CLASSES = ("background", "person", "cat", "cup", "rocket", "sky", "grass")
LABEL = {name: i for i, name in enumerate(CLASSES)}
LABEL["ignore"] = 255

MAX_SIDE = 512      # shipped images are downscaled so that the longer side is at most this
JPEG_QUALITY = 95
BAND = 2            # ignore band: pixels within BAND px of a label boundary become 255

# id -> (skimage.data loader, source (width, height)).  Licences: see README.md.
SOURCES = {
    "astronaut": ("astronaut", (512, 512)),
    "camera": ("camera", (512, 512)),
    "chelsea": ("chelsea", (451, 300)),
    "coffee": ("coffee", (600, 400)),
    "rocket": ("rocket", (640, 427)),
}

# id -> shapes drawn in order over a background (0) canvas, in source-image pixel coordinates.
#   ("polygon", label, [(x, y), ...])
#   ("line", label, [(x, y), ...], width)
#   ("ellipse", label, (x0, y0, x1, y1))
ANNOTATIONS = {
    # Eileen Collins in an orange flight suit in front of a US flag and a space-shuttle model,
    # holding her helmet.  Studio backdrop and flag = background.
    "astronaut": [
        ("polygon", "person", [
            (155, 106), (153, 80), (158, 55), (175, 32), (200, 18), (228, 14), (258, 20),
            (283, 38), (298, 65), (299, 100), (290, 122), (280, 133), (265, 140), (259, 150),
            (256, 165), (253, 175), (268, 182), (280, 190), (293, 210), (302, 233), (315, 237),
            (327, 247), (340, 267), (350, 290), (358, 315), (362, 345),
            (330, 357), (306, 380), (290, 410), (281, 450), (278, 512),
            (22, 512), (20, 450), (22, 400), (24, 330), (38, 290), (50, 262), (60, 247),
            (77, 233), (93, 217), (110, 207), (114, 195), (118, 172), (130, 156), (150, 150),
            (170, 147), (175, 135), (165, 118),
        ]),
        # the helmet she holds: not part of the person, not a class of its own -> ignore
        ("polygon", "ignore", [
            (278, 512), (281, 450), (293, 405), (315, 375), (345, 355), (385, 344),
            (425, 345), (460, 360), (488, 385), (500, 415), (505, 450), (512, 462), (512, 512),
        ]),
        # the space-shuttle model (orbiter, tank, boosters, stand): ambiguous w.r.t. "rocket" -> ignore
        ("polygon", "ignore", [
            (398, 0), (438, 0), (440, 40), (452, 48), (456, 200), (460, 225), (452, 240),
            (462, 265), (472, 282), (368, 287), (366, 265), (375, 245), (355, 225), (358, 200),
            (378, 180), (382, 80), (390, 45),
        ]),
    ],
    # Grayscale photo: a man filming with a camcorder on a tripod in a field, sky and campus
    # buildings behind.  Camera, tripod and buildings/trees on the horizon = background.
    "camera": [
        ("polygon", "sky", [
            (0, 0), (512, 0), (512, 188), (495, 188), (492, 176), (470, 178), (468, 160),
            (450, 160), (450, 192), (432, 192), (432, 125), (428, 117), (418, 120), (412, 125),
            (412, 190), (405, 190), (398, 180), (388, 168), (375, 163), (360, 163), (350, 166),
            (345, 172), (250, 174), (60, 178), (0, 178),
        ]),
        ("polygon", "grass", [(0, 240), (120, 236), (512, 232), (512, 512), (0, 512)]),
        ("polygon", "person", [
            (150, 107), (162, 100), (170, 83), (185, 68), (210, 63), (240, 73), (260, 93),
            (268, 113), (270, 127), (262, 136), (254, 140), (252, 160), (255, 168), (248, 175),
            (240, 190), (238, 200), (250, 205), (262, 199), (276, 205), (290, 203),
            (298, 212), (301, 228), (303, 250), (303, 270), (290, 283), (270, 295), (250, 310),
            (228, 304), (205, 298), (192, 300), (185, 330), (170, 355), (158, 380), (150, 400),
            (148, 430), (150, 470), (152, 512), (0, 512), (0, 248), (5, 245), (15, 232),
            (30, 212), (40, 197), (50, 180), (60, 162), (80, 140), (95, 130), (120, 118),
        ]),
        # camcorder (background) in front of the face, then the glove holding it (person)
        ("polygon", "background", [
            (253, 138), (325, 138), (326, 180), (300, 183), (275, 183), (262, 178), (256, 170),
        ]),
        ("polygon", "person", [
            (310, 170), (322, 167), (330, 175), (333, 195), (330, 212), (320, 222), (305, 225),
            (300, 215), (305, 190),
        ]),
        # tripod: centre column, head with handle, three legs, spreader (all background)
        ("line", "background", [(293, 200), (293, 480)], 12),
        ("polygon", "background", [(278, 312), (312, 312), (312, 335), (278, 335)]),
        ("line", "background", [(305, 318), (338, 303)], 6),
        ("line", "background", [(285, 330), (237, 495)], 9),
        ("line", "background", [(305, 330), (400, 508)], 9),
        ("line", "background", [(245, 470), (293, 483), (390, 480)], 6),
    ],
    # Close-up of a tabby cat's face (Chelsea); blurred room behind = background.
    "chelsea": [
        ("polygon", "cat", [
            (35, 0), (398, 0), (375, 40), (362, 65), (358, 100), (358, 150), (345, 175),
            (335, 200), (320, 225), (305, 250), (298, 275), (292, 300), (0, 300), (0, 120),
            (20, 115), (30, 100), (28, 60), (32, 20),
        ]),
        # lower right: the blurred chest/whisker area fades into the blurred background -> ignore
        ("polygon", "ignore", [(320, 225), (345, 222), (352, 300), (292, 300), (298, 275), (305, 250)]),
    ],
    # An espresso cup (with handle) on a saucer with a spoon, on a wooden table.
    # Saucer, spoon, table = background.
    "coffee": [
        ("polygon", "cup", [
            (290, 18), (330, 20), (365, 30), (390, 48), (404, 75), (409, 110), (405, 150),
            (398, 180), (390, 200), (380, 217), (367, 233), (347, 247), (330, 262), (318, 280),
            (295, 285), (262, 284), (258, 296), (242, 303), (222, 306), (205, 300), (197, 282),
            (198, 262), (205, 245), (214, 233), (205, 215), (192, 195), (182, 170), (176, 140),
            (173, 110), (176, 80), (192, 50), (220, 30), (255, 20),
        ]),
        # the spoon in front of the cup's lower right side
        ("polygon", "background", [
            (377, 200), (390, 200), (392, 215), (388, 240), (400, 255), (408, 280), (404, 305),
            (390, 320), (365, 326), (340, 320), (327, 300), (326, 275), (335, 255), (355, 245),
            (375, 238), (378, 220),
        ]),
    ],
    # Falcon 9 on the pad at dusk between lattice towers and lightning masts.
    "rocket": [
        ("polygon", "sky", [
            (0, 0), (640, 0), (640, 364), (560, 368), (400, 368), (250, 365), (100, 362), (0, 364),
        ]),
        # cloud bank / tree line on the horizon: neither clearly sky nor ground -> ignore
        ("polygon", "ignore", [
            (0, 364), (100, 362), (250, 365), (400, 368), (560, 368), (640, 364),
            (640, 385), (0, 385),
        ]),
        # lattice towers and masts: sky shows through the lattice -> ignore
        ("polygon", "ignore", [(48, 0), (90, 0), (84, 150), (80, 360), (78, 427), (0, 427), (0, 320), (20, 200), (40, 60)]),
        ("polygon", "ignore", [(558, 0), (602, 0), (606, 100), (615, 250), (630, 380), (640, 410), (640, 427), (572, 427), (568, 300), (564, 150)]),
        ("polygon", "ignore", [(197, 122), (206, 122), (206, 190), (208, 380), (172, 380), (185, 190), (196, 188)]),
        ("polygon", "ignore", [(442, 121), (452, 121), (452, 190), (458, 200), (475, 420), (437, 420), (440, 200)]),
        ("polygon", "rocket", [
            (322, 126), (327, 131), (331, 145), (333, 165), (335, 180), (335, 400), (333, 407),
            (311, 407), (309, 400), (309, 180), (311, 165), (313, 145), (317, 131),
        ]),
    ],
}


def output_size(src_size: tuple[int, int]) -> tuple[int, int]:
    w, h = src_size
    s = min(1.0, MAX_SIDE / max(w, h))
    return round(w * s), round(h * s)


def rasterise(image_id: str) -> np.ndarray:
    _, src_size = SOURCES[image_id]
    w, h = output_size(src_size)
    sx, sy = w / src_size[0], h / src_size[1]

    def scale(points):
        return [(x * sx, y * sy) for x, y in points]

    canvas = Image.new("L", (w, h), LABEL["background"])
    draw = ImageDraw.Draw(canvas)
    for shape in ANNOTATIONS[image_id]:
        kind, label = shape[0], LABEL[shape[1]]
        if kind == "polygon":
            draw.polygon(scale(shape[2]), fill=label)
        elif kind == "line":
            draw.line(scale(shape[2]), fill=label, width=max(1, round(shape[3] * sx)))
        elif kind == "ellipse":
            x0, y0, x1, y1 = shape[2]
            draw.ellipse([x0 * sx, y0 * sy, x1 * sx, y1 * sy], fill=label)
        else:
            raise ValueError(f"{image_id}: unknown shape kind {kind!r}")

    arr = np.asarray(canvas).copy()
    if BAND > 0:
        # A pixel is on a boundary if its (2*BAND+1)^2 window holds two different non-ignore
        # labels: ignore is mapped to 0 for the max filter and to 254 for the min filter, so it
        # never creates a boundary by itself.
        k = 2 * BAND + 1
        hi = np.asarray(Image.fromarray(np.where(arr == 255, 0, arr).astype(np.uint8)).filter(ImageFilter.MaxFilter(k)))
        lo = np.asarray(Image.fromarray(np.where(arr == 255, 254, arr).astype(np.uint8)).filter(ImageFilter.MinFilter(k)))
        arr[hi > lo] = 255
    return arr


def export_images() -> None:
    from skimage import data  # optional: only needed to re-create the JPEGs

    IMG_DIR.mkdir(exist_ok=True)
    for image_id, (loader, src_size) in SOURCES.items():
        img = Image.fromarray(getattr(data, loader)()).convert("RGB")
        assert img.size == src_size, (image_id, img.size, src_size)
        size = output_size(src_size)
        if size != img.size:
            img = img.resize(size, Image.LANCZOS)
        img.save(IMG_DIR / f"{image_id}.jpg", quality=JPEG_QUALITY)


PALETTE = {0: (0, 0, 0), 1: (220, 20, 60), 2: (255, 200, 0), 3: (0, 200, 255), 4: (255, 0, 255),
           5: (70, 130, 255), 6: (0, 220, 0), 255: (255, 255, 255)}


def write_overlay(image_id: str, mask: np.ndarray, out_dir: Path) -> None:
    img = np.asarray(Image.open(IMG_DIR / f"{image_id}.jpg").convert("RGB")).astype(np.float32)
    color = np.zeros_like(img)
    for value, rgb in PALETTE.items():
        color[mask == value] = rgb
    blend = np.where((mask == 0)[..., None], img, 0.45 * img + 0.55 * color)
    out_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(blend.clip(0, 255).astype(np.uint8)).save(out_dir / f"{image_id}_overlay.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", action="store_true", help="re-export JPEGImages/ from skimage.data")
    parser.add_argument("--overlays", type=Path, help="write <id>_overlay.png review images to this folder")
    args = parser.parse_args()

    if args.images:
        export_images()
    ANN_DIR.mkdir(exist_ok=True)
    ids = sorted(SOURCES)
    for image_id in ids:
        mask = rasterise(image_id)
        with Image.open(IMG_DIR / f"{image_id}.jpg") as img:
            assert img.size == (mask.shape[1], mask.shape[0]), (image_id, img.size, mask.shape)
        Image.fromarray(mask, mode="L").save(ANN_DIR / f"{image_id}.png", optimize=True)
        if args.overlays:
            write_overlay(image_id, mask, args.overlays)
        values = {int(v): int(n) for v, n in zip(*np.unique(mask, return_counts=True))}
        print(f"{image_id}: {mask.shape[1]}x{mask.shape[0]} " + ", ".join(
            f"{CLASSES[v] if v < len(CLASSES) else 'ignore'}={n / mask.size:.1%}" for v, n in values.items()))
    (HERE / "val.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


if __name__ == "__main__":
    main()
