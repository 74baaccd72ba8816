"""RetinaFace: the Flax network, priors, decoding, NMS and `detect` against the IConFace authors'
`retinaface_runtime.py` (../shared/reference, imported from there) on random weights converted by
`convert.retinaface`, and the converter's refusals."""
from __future__ import annotations

import collections
import re
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import import_or_skip, rel_err, require
from convert import retinaface as convert_retinaface
from iconface_jax import weights
from iconface_jax.models import retinaface

pytestmark = pytest.mark.parity

torch = import_or_skip("torch")
cv2 = import_or_skip("cv2")


class _IntermediateLayerGetter(torch.nn.ModuleDict):
    """torchvision's `IntermediateLayerGetter`: the model's children up to the last returned one, run in order,
    returning {return_layers[name]: output}."""

    def __init__(self, model: torch.nn.Module, return_layers: dict[str, int]):
        wanted, layers = set(return_layers), collections.OrderedDict()
        for name, child in model.named_children():
            layers[name] = child
            wanted.discard(name)
            if not wanted:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x):
        out = collections.OrderedDict()
        for name, child in self.items():
            x = child(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


@pytest.fixture(scope="module")
def rt(shared_dir):
    """Their runtime; `torchvision` (not loadable beside CPU torch here) stubbed with the one class it uses while it
    is imported, then removed."""
    tv, models, utils = (types.ModuleType(n) for n in ("torchvision", "torchvision.models",
                                                        "torchvision.models._utils"))
    utils.IntermediateLayerGetter, models._utils, tv.models = _IntermediateLayerGetter, utils, models
    stubs = {"torchvision": tv, "torchvision.models": models, "torchvision.models._utils": utils}
    sys.modules.update(stubs)
    path = str(shared_dir / "reference")
    sys.path.insert(0, path)
    try:
        from flux_faceir import retinaface_runtime
    finally:
        sys.path.remove(path)
        for name in stubs:
            del sys.modules[name]
    return retinaface_runtime


def _their_model(rt, network: str, seed: int = 0):
    """Their RetinaFace with torch's random init and random BatchNorm affines and statistics, in eval mode."""
    torch.manual_seed(seed)
    model = rt.RetinaFace(rt.get_config(network)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.normal_(1, 0.1)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _convert(capsys, *args: str) -> tuple[int, str]:
    rc = convert_retinaface.main(list(args))
    return rc, capsys.readouterr().err


def _converted(rt, tmp_path, capsys, network: str, *extra: str):
    """(their model, its state dict saved with DataParallel's `module.` prefix, our converted model)."""
    model = _their_model(rt, network)
    src = tmp_path / f"{network}.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, src)
    rc, err = _convert(capsys, "--src", str(src), "--dst", str(tmp_path / network), *extra)
    assert rc == 0, err
    assert f"RetinaFace {network}" in err
    return model, src, retinaface.load(str(tmp_path / network))


@pytest.fixture(scope="module")
def r34(rt, tmp_path_factory):
    """Their random ResNet-34 detector (built by their own `RetinaFaceDetector` from the saved file) and ours."""
    tmp = tmp_path_factory.mktemp("retinaface")
    src = tmp / "retinaface_r34.pth"
    torch.save(_their_model(rt, "resnet34").state_dict(), src)
    assert convert_retinaface.main(["--src", str(src), "--dst", str(tmp / "r34")]) == 0
    theirs = rt.RetinaFaceDetector(weights_path=str(src), network="resnet34", device=torch.device("cpu"))
    return theirs, retinaface.load(str(tmp / "r34"))


@nnx.jit
def _forward(model, x):
    return model(x)


# ------------------------------------------------------------------------------ network and layout


@pytest.mark.parametrize("network", sorted(retinaface.NETWORKS))
def test_plan_matches_their_state_dict(rt, network):
    theirs = {k: tuple(v.shape) for k, v in rt.RetinaFace(rt.get_config(network)).state_dict().items()
              if not k.endswith(".num_batches_tracked")}
    plan = convert_retinaface.official_plan(retinaface.RetinaFaceConfig(network))
    assert {key: shape for key, shape, _ in plan.values()} == theirs


@pytest.mark.parametrize("network", ["resnet18", "resnet50", "mobilenetv1_0.25"])
def test_raw_outputs_match(rt, tmp_path, capsys, network):
    # An odd size: every stride-2 stage rounds up, and the FPN upsamples to odd sizes.
    theirs, _, ours = _converted(rt, tmp_path, capsys, network)
    x = np.random.default_rng(0).uniform(-120, 130, (2, 3, 45, 70)).astype(np.float32)
    with torch.no_grad():
        expected = [t.numpy() for t in theirs(torch.from_numpy(x))]
    got = _forward(ours, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert len(retinaface.priors((45, 70))) == expected[0].shape[1]
    for name, a, b in zip(("loc", "conf", "landmarks"), got, expected):
        assert a.shape == b.shape and a.dtype == jnp.float32, name
        assert rel_err(a, b) < 2e-5, (name, rel_err(a, b))


def test_resnet34_raw_outputs_match(r34):
    theirs, ours = r34
    x = np.random.default_rng(1).uniform(-120, 130, (1, 3, 64, 81)).astype(np.float32)
    with torch.no_grad():
        expected = [t.numpy() for t in theirs.model(torch.from_numpy(x))]
    for name, a, b in zip(("loc", "conf", "landmarks"), _forward(ours, jnp.asarray(x.transpose(0, 2, 3, 1))),
                          expected):
        assert rel_err(a, b) < 2e-5, (name, rel_err(a, b))


@pytest.mark.parametrize("size", [(64, 64), (45, 70), (333, 257)])
def test_priors_match(rt, size):
    expected = rt.PriorBox(rt.get_config("resnet34"), image_size=size).generate_anchors().numpy()
    np.testing.assert_array_equal(retinaface.priors(size), expected)


def test_decode_matches(rt):
    rng = np.random.default_rng(2)
    prior = torch.from_numpy(retinaface.priors((45, 70)))
    loc, marks = (rng.standard_normal((len(prior), n)).astype(np.float32) for n in (4, 10))
    np.testing.assert_allclose(retinaface.decode(jnp.asarray(loc), jnp.asarray(prior.numpy())),
                               rt.decode(torch.from_numpy(loc), prior, [0.1, 0.2]).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(retinaface.decode_landmarks(jnp.asarray(marks), jnp.asarray(prior.numpy())),
                               rt.decode_landmarks(torch.from_numpy(marks), prior, [0.1, 0.2]).numpy(),
                               rtol=1e-6, atol=1e-7)


def test_nms_matches(rt):
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 100, (300, 2))
    dets = np.concatenate([xy, xy + rng.uniform(5, 40, (300, 2)), rng.uniform(0, 1, (300, 1))], 1).astype(np.float32)
    for threshold in (0.1, 0.4, 0.7):
        keep = retinaface.nms(dets, threshold)
        assert keep == rt.nms(dets, threshold)
        assert 1 < len(keep) < len(dets)


# ------------------------------------------------------------------------------------- detect


def _photo(shared_dir) -> np.ndarray:
    """A real degraded whole photo, shrunk to a short edge of 160 (RGB uint8)."""
    bgr = cv2.imread(str(require(shared_dir / "faces" / "whole" / "deg_4.png", "a whole photo")), cv2.IMREAD_COLOR)
    height, width = bgr.shape[:2]
    small = cv2.resize(bgr, (160, round(height * 160 / width)), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(small[..., ::-1])


def _synthetic() -> np.ndarray:
    """Smooth blobs plus noise, RGB uint8, an odd size."""
    yy, xx = np.mgrid[:131, :177]
    rng = np.random.default_rng(4)
    image = sum(rng.uniform(60, 120) * np.exp(-((yy - rng.uniform(0, 131)) ** 2 + (xx - rng.uniform(0, 177)) ** 2)
                                             / rng.uniform(100, 800)) for _ in range(6))
    image = image[..., None] * rng.uniform(0.5, 1.0, 3) + rng.normal(60, 20, (131, 177, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("case, resize_short", [("photo", 200), ("synthetic", 100)], ids=["photo_upscaled",
                                                                                          "synthetic_as_is"])
def test_detect_matches_their_detector(r34, shared_dir, case, resize_short):
    theirs, ours = r34
    image = _photo(shared_dir) if case == "photo" else _synthetic()
    assert (min(image.shape[:2]) < resize_short) == (case == "photo")  # one resized, one not
    expected = theirs.detect(image, conf_threshold=0.6, pre_nms_topk=5000, nms_threshold=0.4, post_nms_topk=750,
                             resize_short_edge=resize_short)
    got = retinaface.detect(ours, image, threshold=0.6, resize_short=resize_short)  # our defaults are theirs
    above = int((np.asarray(_raw_scores(ours, image, resize_short)) > 0.6).sum())
    assert 5 < len(expected) < above  # not vacuous: faces kept, and NMS removed some
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got[:, 4], expected[:, 4], rtol=0, atol=1e-5)  # scores
    assert rel_err(got[:, :4], expected[:, :4]) < 1e-5  # boxes
    assert rel_err(got[:, 5:], expected[:, 5:]) < 1e-5  # landmarks


def _raw_scores(model, image: np.ndarray, resize_short: int) -> np.ndarray:
    """Every prior's face score, before the threshold and NMS."""
    return np.asarray(retinaface.detect(model, image, threshold=-1.0, resize_short=resize_short,
                                        nms_threshold=2.0, keep_top_k=10**9)[:, 4])


def test_detect_top_k_and_batch(r34):
    _, ours = r34
    image = _synthetic()
    full = retinaface.detect(ours, image, threshold=0.6, resize_short=0)
    assert np.all(np.diff(full[:, 4]) <= 0)
    np.testing.assert_array_equal(retinaface.detect(ours, image, threshold=0.6, resize_short=0, keep_top_k=3),
                                  full[:3])
    flipped = np.ascontiguousarray(image[:, ::-1])
    batch = retinaface.detect_batch(ours, np.stack([image, flipped]), threshold=0.6, resize_short=0)
    np.testing.assert_allclose(batch[0], full, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(batch[1], retinaface.detect(ours, flipped, threshold=0.6, resize_short=0),
                               rtol=1e-5, atol=1e-3)
    assert not np.array_equal(batch[0], batch[1])


def test_detect_refuses_bad_images(r34):
    _, ours = r34
    with pytest.raises(ValueError, match=r"image must be uint8 RGB of shape \(H, W, 3\)"):
        retinaface.detect(ours, np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="images must be uint8 RGB"):
        retinaface.detect(ours, np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"one size, got shapes \[\(32, 32, 3\), \(32, 40, 3\)\]"):
        retinaface.detect_batch(ours, [np.zeros((32, 32, 3), np.uint8), np.zeros((32, 40, 3), np.uint8)])


def test_resize_scale_rule():
    assert retinaface.resize_scale(200, 300, 640) == (3.2, 640, 960)
    assert retinaface.resize_scale(1000, 700, 640) == (1.0, 1000, 700)  # never downscaled
    assert retinaface.resize_scale(50, 81, 100) == (2.0, 100, 162)
    assert retinaface.resize_scale(50, 81, 0) == (1.0, 50, 81)
    assert retinaface.resize_scale(3, 5, 4) == (4 / 3, 4, 7)  # sides rounded, not truncated


# -------------------------------------------------------------------------- converter refusals


def _state(rt, network: str = "resnet18") -> dict:
    return {k: v for k, v in rt.RetinaFace(rt.get_config(network)).state_dict().items()}


@pytest.mark.parametrize("change, expected", [
    ("missing", r"missing tensor 'ssh2\.conv5X5_2\.0\.weight'"),
    ("shape", r"'ssh2\.conv5X5_2\.0\.weight' has shape \(32, 32, 3, 1\), expected \(32, 32, 3, 3\)"),
    ("unexpected", r"unexpected tensor 'ssh2\.conv9X9\.0\.weight'"),
    ("integer", r"'ssh2\.conv5X5_2\.0\.weight' is int32, expected floating point"),
])
def test_bad_state_dict_names_file_and_key(rt, tmp_path, capsys, change, expected):
    state = _state(rt)
    key = "ssh2.conv5X5_2.0.weight"
    if change == "missing":
        del state[key]
    elif change == "shape":
        state[key] = torch.zeros(32, 32, 3, 1)
    elif change == "unexpected":
        state["ssh2.conv9X9.0.weight"] = torch.zeros(3)
    else:
        state[key] = state[key].to(torch.int32)
    src = tmp_path / "bad.pth"
    torch.save(state, src)
    rc, err = _convert(capsys, "--src", str(src), "--dst", str(tmp_path / "out"))
    assert rc == 1 and str(src) in err and re.search(expected, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]  # nothing half-written


def test_network_flag_and_inference(rt, tmp_path, capsys):
    src = tmp_path / "r18.pth"
    torch.save(_state(rt), src)
    rc, err = _convert(capsys, "--src", str(src), "--dst", str(tmp_path / "a"), "--network", "resnet34")
    assert rc == 1 and str(src) in err and "missing tensor 'fx.layer1.2.bn1.bias' (and 79 more)" in err
    rc, err = _convert(capsys, "--src", str(src), "--dst", str(tmp_path / "a"), "--network", "resnet99")
    assert rc == 1 and "--network 'resnet99' is not a known RetinaFace network" in err
    rc, err = _convert(capsys, "--src", str(src), "--dst", str(tmp_path / "a"), "--network", "resnet18")
    assert rc == 0 and "RetinaFace resnet18" in err
    assert weights.read_config(str(tmp_path / "a"), retinaface.FAMILY)["network"] == "resnet18"
    for network in ("mobilenetv1_0.50", "mobilenetv1", "resnet34"):
        path = tmp_path / f"{network}.pth"
        torch.save(_state(rt, network), path)
        rc, err = _convert(capsys, "--src", str(path), "--dst", str(tmp_path / network))
        assert rc == 0 and f"RetinaFace {network}\n" in err, err


# Names and shapes in biubug6/Pytorch_Retinaface's checkpoints, read off its models/net.py and models/retinaface.py
# (`body` = IntermediateLayerGetter, `conv_dw` = one Sequential [dw conv, BN, act, pw conv, BN, act], and
# `ClassHead` etc. = ModuleLists of modules holding `conv1x1`).
BIUBUG6_KEYS = {
    "mobilenetv1_0.25": {"body.stage1.0.0.weight": (8, 3, 3, 3), "body.stage1.1.0.weight": (8, 1, 3, 3),
                         "body.stage1.1.3.weight": (16, 8, 1, 1), "body.stage3.1.4.running_var": (256,),
                         "fpn.output3.0.weight": (64, 256, 1, 1), "ssh3.conv7x7_3.1.bias": (16,),
                         "ClassHead.2.conv1x1.bias": (4,), "BboxHead.0.conv1x1.weight": (8, 64, 1, 1),
                         "LandmarkHead.1.conv1x1.weight": (20, 64, 1, 1)},
    "resnet50": {"body.conv1.weight": (64, 3, 7, 7), "body.layer4.2.conv3.weight": (2048, 512, 1, 1),
                 "body.layer2.0.downsample.1.running_mean": (512,), "fpn.output1.0.weight": (256, 512, 1, 1),
                 "ClassHead.0.conv1x1.weight": (4, 256, 1, 1)},
}
HEADS = {"class": "ClassHead", "bbox": "BboxHead", "landmark": "LandmarkHead"}


def _biubug6(key: str) -> str:
    """A runtime state-dict key under biubug6's names."""
    key = re.sub(r"^fx\.", "body.", key)
    key = re.sub(r"^body\.(stage\d\.\d+)\.([01])\.([01])\.", lambda m: f"body.{m[1]}.{3 * int(m[2]) + int(m[3])}.",
                 key)
    return re.sub(r"^(class|bbox|landmark)_head\.\w+\.(\d)\.", lambda m: f"{HEADS[m[1]]}.{m[2]}.conv1x1.", key)


@pytest.mark.parametrize("network", sorted(BIUBUG6_KEYS))
def test_biubug6_names(rt, network):
    translated = {convert_retinaface.biubug6_key(key): shape
                  for key, shape, _ in convert_retinaface.official_plan(retinaface.RetinaFaceConfig(network)).values()}
    assert BIUBUG6_KEYS[network].items() <= translated.items()
    state = rt.RetinaFace(rt.get_config(network)).state_dict()
    assert translated == {_biubug6(k): tuple(v.shape) for k, v in state.items()
                          if not k.endswith(".num_batches_tracked")}


def test_biubug6_checkpoint_converts_like_the_runtime_one(rt, tmp_path, capsys):
    state = _their_model(rt, "mobilenetv1_0.25").state_dict()
    torch.save({"module." + _biubug6(k): v for k, v in state.items()}, tmp_path / "mobilenet0.25_Final.pth")
    torch.save(state, tmp_path / "runtime.pth")
    for name in ("mobilenet0.25_Final", "runtime"):
        rc, err = _convert(capsys, "--src", str(tmp_path / f"{name}.pth"), "--dst", str(tmp_path / name))
        assert rc == 0 and "RetinaFace mobilenetv1_0.25" in err, err
    ours, theirs = (weights.base_params(retinaface.load(str(tmp_path / n))) for n in ("mobilenet0.25_Final", "runtime"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name].get_value(), theirs[name].get_value(), err_msg=name)


@pytest.mark.parametrize("state, expected", [
    ({"fx.features.0.0.weight": (32, 3, 3, 3)}, r"a MobileNet v2 RetinaFace .*not supported"),
    ({"encoder.0.weight": (2,)}, r"not a RetinaFace checkpoint \(the authors' runtime or biubug6 layout\)"),
    ({f"fx.layer3.{i}.conv1.weight": (2,) for i in range(4)}, "4 basic blocks in 'fx.layer3' match no known"),
    ({"fx.stage1.0.0.weight": (24, 3, 3, 3)}, "'fx.stage1.0.0.weight' has 24 output channels"),
], ids=["mobilenet_v2", "other_network", "resnet_depth", "mobilenet_width"])
def test_unknown_networks_are_refused(tmp_path, capsys, state, expected):
    src = tmp_path / "weights.pth"
    torch.save({k: torch.zeros(shape) for k, shape in state.items()}, src)
    rc, err = _convert(capsys, "--src", str(src), "--dst", str(tmp_path / "out"))
    assert rc == 1 and str(src) in err and re.search(expected, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pth"]


def test_existing_destination_is_refused(rt, tmp_path, capsys):
    src = tmp_path / "r18.pth"
    torch.save(_state(rt), src)
    (tmp_path / "exists").mkdir()
    rc, err = _convert(capsys, "--src", str(src), "--dst", str(tmp_path / "exists"))
    assert rc == 1 and "already exists" in err and not any((tmp_path / "exists").iterdir())


def test_load_rejects_other_family(tmp_path):
    weights.save(str(tmp_path / "vae"), "vae", {}, {"x": np.zeros(2, np.float32)})
    with pytest.raises(weights.WeightsError, match="expected 'retinaface'"):
        retinaface.load(str(tmp_path / "vae"))
