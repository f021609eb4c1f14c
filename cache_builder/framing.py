"""Crop or whole frames: which framing a build uses, and the aspect ratio whole frames are fitted to.

A square centre crop is the models' own recipe, but it cuts the sides off every wide frame: on a 16:9 camera-trap
frame, 22% of the picture on each side is never cached and never searchable. `fit` keeps the whole frame: the
model input takes the dataset's dominant aspect ratio (a 7x12 grid for 16:9 at EfficientNet-Lite0's 224), and
images of another ratio are letterboxed, their padding recorded and never matched.

`--frame auto` (the default) asks the sources: camera-trap formats want `fit`, square-image formats (ImageNet,
NIH ChestX-ray14, the demo) want `crop`, and a folder or manifest of unknown images is measured: `fit` when the
dominant aspect ratio of a sample of its images is 1.2 or more away from square.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from PIL import Image

from cache_builder.errors import BuildError
from cache_builder.sources import Source, SourceItem

FRAME_CHOICES = ("auto", "crop", "fit")
SQUARE_ENOUGH = 1.2  # aspect ratios within this factor of 1 are cropped by `auto`: little is lost
SAMPLE_SIZE = 256  # images whose headers are read to find the dominant aspect ratio
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class Framing:
    mode: str  # "crop" or "fit"
    aspect: float  # the dominant width / height of the sampled images (1.0 when nothing was measured)
    reason: str  # one line for the user


def image_size(item: SourceItem) -> tuple[int, int] | None:
    """(width, height) as the model will see it (EXIF orientation applied), from the header only; None if
    unreadable (the build skips and lists such files later)."""
    if item.file is None:
        return None
    try:
        with Image.open(item.file) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - any unreadable header: not counted here, reported by the build
        return None
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def dominant_aspect(items: list[SourceItem], sample: int = SAMPLE_SIZE) -> float | None:
    """The most common width/height ratio (to 2 decimals) among up to `sample` evenly spaced items."""
    step = max(1, len(items) // sample)
    ratios = Counter()
    for item in items[::step][:sample]:
        size = image_size(item)
        if size and size[1] > 0:
            ratios[round(size[0] / size[1], 2)] += 1
    return ratios.most_common(1)[0][0] if ratios else None


def choose_framing(requested: str, sources: list[Source], items: list[SourceItem]) -> Framing:
    if requested not in FRAME_CHOICES:
        raise BuildError(f"--frame {requested}: use one of {', '.join(FRAME_CHOICES)}")
    wanted = {source.frame for source in sources}
    aspect = None
    if requested != "auto":
        mode, reason = requested, f"--frame {requested}"
    elif "fit" in wanted:
        kinds = sorted(s.kind for s in sources if s.frame == "fit")
        mode, reason = "fit", f"whole frames: {', '.join(kinds)} images are wide"
    elif wanted == {"crop"}:
        mode, reason = "crop", "square centre crop: these sources' images are square or made for it"
    else:
        aspect = dominant_aspect(items) or 1.0
        far = max(aspect, 1 / aspect) >= SQUARE_ENOUGH
        mode = "fit" if far else "crop"
        reason = f"the images' dominant aspect ratio is {aspect:g}: " + ("whole frames" if far else "cropped")
    if mode == "crop":
        return Framing("crop", 1.0, reason)
    return Framing("fit", aspect or dominant_aspect(items) or 1.0, reason)
