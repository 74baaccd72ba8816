"""ArcFace IResNet: the Flax network and its converter against the official golden vectors (insightface's
arcface_torch `iresnet50`), the converter's architecture inference and errors, and `embed_faces` on a real
face (golden and face tests skip when ../shared is absent). The safe-loading path the two recognisers
share is tested at length in test_adaface.py."""
from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import SHARED, CustomObject, golden_state, import_or_skip, rel_err, require, state_from_plan
from convert import arcface as convert_arcface
from iconface_jax import weights
from iconface_jax.models import arcface

pytestmark = pytest.mark.parity

torch = import_or_skip("torch")

GOLDEN = SHARED / "golden"
STAGES = ("input_layer", "stage1", "stage2", "stage3", "stage4")


def _official_state(arch: str, fill=None) -> dict:
    """An official-layout state dict of `arch` (helpers.state_from_plan)."""
    return state_from_plan(convert_arcface.official_plan(arcface.ArcFaceConfig.from_arch(arch)), fill)


def _convert(capsys, *args: str) -> tuple[int, str]:
    rc = convert_arcface.main(list(args))
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def golden():
    keys = json.loads(require(GOLDEN / "arcface_ir50_keys.json", "ArcFace golden keys").read_text())
    return keys, dict(np.load(require(GOLDEN / "arcface_ir50_golden.npz", "ArcFace golden vectors")))


@pytest.fixture(scope="module")
def r50_dir(golden, tmp_path_factory):
    """The golden-recipe R50 as a release-style `backbone.pth` (a plain state dict), converted with the CLI."""
    keys, _ = golden
    tmp = tmp_path_factory.mktemp("arcface")
    torch.save(golden_state(keys), tmp / "backbone.pth")
    assert convert_arcface.main(["--src", str(tmp / "backbone.pth"), "--dst", str(tmp / "r50")]) == 0
    return tmp / "r50"


@pytest.fixture(scope="module")
def r50(r50_dir):
    return arcface.load(str(r50_dir))


# ------------------------------------------------------------------------------ layout and golden


def test_plan_matches_official_keys(golden):
    keys, _ = golden
    official = {e["key"]: tuple(e["shape"]) for e in keys if e["kind"] != "bn_count"}
    plan = convert_arcface.official_plan(arcface.ArcFaceConfig.from_arch("r50"))
    assert {key: shape for key, shape, _ in plan.values()} == official
    assert all(e["key"].endswith(".num_batches_tracked") for e in keys if e["kind"] == "bn_count")


@pytest.mark.parametrize("arch", sorted(arcface.ARCHS))
def test_model_parameters_match_plan(arch):
    config = arcface.ArcFaceConfig.from_arch(arch)
    assert config.arch == arch
    model = nnx.eval_shape(lambda: arcface.ArcFace(config, rngs=nnx.Rngs(0)))
    params = weights.base_params(model)
    plan = convert_arcface.official_plan(config)
    assert set(params) == set(plan)
    for name, (_, shape, fn) in plan.items():
        expected = (fn or (lambda x: x))(np.empty(shape, np.float32)).shape
        assert params[name].get_value().shape == expected, name
    assert weights.named_params(model, nnx.Variable).keys() == params.keys()  # no stray state


def test_golden_r50(r50, r50_dir, golden):
    _, g = golden
    assert weights.read_config(str(r50_dir), arcface.FAMILY)["arch"] == "r50"
    x = jnp.asarray(g["input_rgb_nchw"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    features, stages = nnx.jit(lambda m, x: m(x, return_stages=True))(r50, x)
    assert features.dtype == jnp.float32 and features.shape == (3, 512)
    features = np.asarray(features, np.float64)
    for i in range(3):
        assert rel_err(features[i], g["features"][i]) < 1e-5, i
    unit = features / np.linalg.norm(features, axis=-1, keepdims=True)
    unit_ref = g["features"] / np.linalg.norm(g["features"], axis=-1, keepdims=True)
    np.testing.assert_allclose(unit, unit_ref, rtol=0, atol=1e-5)
    for name in STAGES:
        mean = np.asarray(stages[name], np.float64).mean(axis=(1, 2))
        np.testing.assert_allclose(mean, g[f"{name}_mean"], rtol=1e-4, atol=2e-5, err_msg=name)


def test_input_shape_is_checked(r50):
    with pytest.raises(ValueError, match=r"RGB NHWC .*112, 112, 3"):
        r50(jnp.zeros((1, 3, 112, 112)))


def test_embed_faces_is_the_identity_crop_then_the_model(r50, shared_dir):
    """On a real 512 face: crop 32:480, 4x4 mean pool, RGB kept, then the model (written out by hand)."""
    cv2 = import_or_skip("cv2")
    path = sorted((shared_dir / "faces" / "supp_ref_ffhq_moderate").iterdir())[0] / "gt.jpg"
    rgb = (cv2.imread(str(path))[..., ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5
    assert rgb.shape == (512, 512, 3)
    features = nnx.jit(arcface.embed_faces)(r50, jnp.asarray(rgb[None]))
    by_hand = np.ascontiguousarray(rgb[32:480, 32:480].reshape(112, 4, 112, 4, 3).mean((1, 3))[None])
    expected = nnx.jit(lambda m, x: m(x))(r50, jnp.asarray(by_hand))
    assert rel_err(features, expected) < 1e-5
    flipped = nnx.jit(lambda m, x: m(x))(r50, jnp.asarray(by_hand[..., ::-1].copy()))
    assert rel_err(features, flipped) > 1e-2  # the channel order matters: RGB, not AdaFace's BGR


# ------------------------------------------------------------------------------- other sources


def test_prefixed_state_dict_and_safetensors_r18(tmp_path, capsys):
    state = _official_state("r18")
    pth = tmp_path / "ddp.pth"
    torch.save({"module." + k: v for k, v in state.items()}, pth)  # saved from DataParallel
    rc, err = _convert(capsys, "--src", str(pth), "--dst", str(tmp_path / "a"))
    assert rc == 0, err
    assert "IResNet R18" in err and "2, 2, 2, 2" in err
    model = arcface.load(str(tmp_path / "a"))
    assert model.config.units == (2, 2, 2, 2) and len(model.layer3) == 2
    hwio = lambda key: state[key].numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(model.layer1[0].downsample[0].kernel[...], hwio("layer1.0.downsample.0.weight"))
    np.testing.assert_array_equal(model.layer2[1].conv2.kernel[...], hwio("layer2.1.conv2.weight"))
    assert model.layer2[1].downsample is None
    np.testing.assert_array_equal(model.fc.kernel[...], state["fc.weight"].numpy().T)
    np.testing.assert_array_equal(model.features.scale[...], state["features.weight"].numpy())
    np.testing.assert_array_equal(model.features.var[...], state["features.running_var"].numpy())
    np.testing.assert_array_equal(model.layer4[0].prelu.negative_slope[...], state["layer4.0.prelu.weight"].numpy())

    safetensors_torch = import_or_skip("safetensors.torch")
    st = tmp_path / "r18.safetensors"
    safetensors_torch.save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()},
                                st)
    rc, err = _convert(capsys, "--src", str(st), "--dst", str(tmp_path / "b"), "--dtype", "bf16")
    assert rc == 0, err
    model_b = arcface.load(str(tmp_path / "b"), param_dtype=jnp.bfloat16)
    assert model_b.fc.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(model_b.fc.kernel[...], np.float32),
                                  state["fc.weight"].to(torch.bfloat16).float().numpy().T)


# -------------------------------------------------------------------------- refusals and errors


def test_unsafe_pickle_is_refused_unless_allowed(tmp_path, capsys):
    pth = tmp_path / "custom.pth"
    torch.save(_official_state("r18", fill=0.5) | {"extra": CustomObject()}, pth)
    rc, err = _convert(capsys, "--src", str(pth), "--dst", str(tmp_path / "out"))
    assert rc == 1 and str(pth) in err and "--allow-unsafe-pickle" in err and "CustomObject" in err
    assert not (tmp_path / "out").exists()
    rc, err = _convert(capsys, "--src", str(pth), "--dst", str(tmp_path / "out"), "--allow-unsafe-pickle")
    assert rc == 1 and "'extra' of the state dict is a CustomObject, not a tensor" in err  # read, then refused


@pytest.mark.parametrize("change, expected", [
    ("missing", r"missing tensor 'layer3\.1\.conv2\.weight'"),
    ("shape", r"'layer3\.1\.conv2\.weight' has shape \(256, 256, 1, 3\), expected \(256, 256, 3, 3\)"),
    ("unexpected", r"unexpected tensor 'layer3\.1\.conv3\.weight'"),
    ("extra_block", r"blocks per stage \(2, 2, 3, 2\) .*match no known IResNet"),
    ("not_iresnet", r"not an ArcFace IResNet state dict"),
])
def test_bad_state_dict_names_file_and_key(tmp_path, capsys, change, expected):
    state = _official_state("r18", fill=0.5)
    if change == "missing":
        del state["layer3.1.conv2.weight"]
    elif change == "shape":
        state["layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 3)
    elif change == "unexpected":
        state["layer3.1.conv3.weight"] = torch.zeros(3)
    elif change == "extra_block":
        state["layer3.2.bn1.weight"] = torch.zeros(256)
    else:
        state = {"encoder.weight": torch.zeros(2)}
    pth = tmp_path / "bad.pth"
    torch.save(state, pth)
    rc, err = _convert(capsys, "--src", str(pth), "--dst", str(tmp_path / "out"))
    assert rc == 1 and str(pth) in err
    assert re.search(expected, err), err
    assert list(tmp_path.iterdir()) == [pth]  # nothing half-written


def test_load_rejects_other_family(tmp_path):
    weights.save(str(tmp_path / "ada"), "adaface", {}, {"x": np.zeros(2, np.float32)})
    with pytest.raises(weights.WeightsError, match="expected 'arcface'"):
        arcface.load(str(tmp_path / "ada"))


def test_config_is_checked():
    with pytest.raises(ValueError, match="unknown ArcFaceConfig architecture 'r42'"):
        arcface.ArcFaceConfig.from_arch("r42")
    with pytest.raises(ValueError, match="each of 4 stages"):
        arcface.ArcFaceConfig(units=(2, 2, 2), channels=(64, 128, 256))
