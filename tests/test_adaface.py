"""AdaFace IR: the Flax network and its converter against the official golden vectors, the converter's
refusals and errors, and `embed_faces` on real FFHQ-aligned faces (skipped when ../shared is absent)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import CustomObject, golden_state, import_or_skip, require, state_from_plan
from convert import adaface as convert_adaface
from iconface_jax import weights
from iconface_jax.models import adaface, recognition

pytestmark = pytest.mark.parity

torch = import_or_skip("torch")

SHARED = Path(__file__).parents[1] / ".." / "shared"
GOLDEN = SHARED / "golden"
FACES = SHARED / "faces"
SPLITS = ("supp_ref_ffhq_moderate", "supp_ref_ffhq_severe", "supp_ref_celeba_test_ref", "supp_ref_celebhqref100")
STAGES = ("input_layer", "stage1", "stage2", "stage3", "stage4")


def _official_state(arch: str, fill=None) -> dict:
    """An official-layout state dict of `arch` (helpers.state_from_plan)."""
    return state_from_plan(convert_adaface.official_plan(adaface.AdaFaceConfig.from_arch(arch)), fill)


def _lightning(state: dict, **extra) -> dict:
    return {"state_dict": {"model." + k: v for k, v in state.items()} | {"head.kernel": torch.zeros(512, 4)},
            "epoch": 3, "global_step": 100, **extra}


def _convert(capsys, *args: str) -> tuple[int, str]:
    rc = convert_adaface.main(list(args))
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def golden():
    keys = json.loads(require(GOLDEN / "adaface_ir50_keys.json", "AdaFace golden keys").read_text())
    return keys, dict(np.load(require(GOLDEN / "adaface_ir50_golden.npz", "AdaFace golden vectors")))


@pytest.fixture(scope="module")
def ir50_dir(golden, tmp_path_factory):
    """The golden-recipe IR-50 as an official Lightning checkpoint, converted with the CLI."""
    keys, _ = golden
    state = golden_state(keys)
    tmp = tmp_path_factory.mktemp("adaface")
    ckpt = tmp / "adaface_ir50_ms1mv2.ckpt"
    torch.save(_lightning(state, hyper_parameters={"arch": "ir_50", "lr": 0.1}), ckpt)
    dst = tmp / "ir50"
    assert convert_adaface.main(["--src", str(ckpt), "--dst", str(dst), "--dtype", "float32"]) == 0
    return dst


@pytest.fixture(scope="module")
def ir50(ir50_dir):
    return adaface.load(str(ir50_dir))


@nnx.jit
def _forward_stages(model, x):
    return model(x, return_stages=True)


@nnx.jit
def _embed(model, rgb):
    return adaface.embed_faces(model, rgb)


# ------------------------------------------------------------------------------ layout and golden


def test_plan_matches_official_keys(golden):
    keys, _ = golden
    official = {e["key"]: tuple(e["shape"]) for e in keys if e["kind"] != "bn_count"}
    plan = convert_adaface.official_plan(adaface.AdaFaceConfig.from_arch("ir_50"))
    assert {key: shape for key, shape, _ in plan.values()} == official
    counts = {e["key"] for e in keys if e["kind"] == "bn_count"}
    assert all(k.endswith(".num_batches_tracked") for k in counts)


@pytest.mark.parametrize("arch", sorted(adaface.ARCHS))
def test_model_parameters_match_plan(arch):
    config = adaface.AdaFaceConfig.from_arch(arch)
    assert config.arch == arch
    model = nnx.eval_shape(lambda: adaface.AdaFace(config, rngs=nnx.Rngs(0)))
    params = weights.base_params(model)
    plan = convert_adaface.official_plan(config)
    assert set(params) == set(plan)
    for name, (_, shape, fn) in plan.items():
        expected = (fn or (lambda x: x))(np.empty(shape, np.float32)).shape
        assert params[name].get_value().shape == expected, name
    assert weights.named_params(model, nnx.Variable).keys() == params.keys()  # no stray state


def test_golden_ir50(ir50, ir50_dir, golden):
    _, g = golden
    assert weights.read_config(str(ir50_dir), adaface.FAMILY)["arch"] == "ir_50"
    x = jnp.asarray(g["input_bgr_nchw"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    embedding, norm, stages = _forward_stages(ir50, x)
    assert embedding.dtype == norm.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(embedding), g["embedding"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(norm), g["norm"], rtol=1e-5, atol=0)
    for name in STAGES:
        mean = np.asarray(stages[name], np.float64).mean(axis=(1, 2))
        np.testing.assert_allclose(mean, g[f"{name}_mean"], rtol=1e-4, atol=2e-5, err_msg=name)


def test_bfloat16_model_stays_close(ir50_dir, golden):
    _, g = golden
    model = adaface.load(str(ir50_dir), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert model.body[0].res_layer[1].kernel[...].dtype == jnp.bfloat16
    embedding, norm = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(g["input_bgr_nchw"].transpose(0, 2, 3, 1)))
    assert embedding.dtype == jnp.float32
    cos = np.sum(np.asarray(embedding) * g["embedding"], axis=-1)
    assert np.all(cos > 0.98), cos


def test_input_shape_is_checked(ir50):
    with pytest.raises(ValueError, match="112, 112, 3"):
        ir50(jnp.zeros((1, 3, 112, 112)))


# ------------------------------------------------------------------------------- other sources


def test_bare_state_dict_and_safetensors_ir18(tmp_path, capsys):
    state = _official_state("ir_18")
    pth = tmp_path / "ir18.pth"
    torch.save(state, pth)
    rc, err = _convert(capsys, "--src", str(pth), "--dst", str(tmp_path / "a"))
    assert rc == 0, err
    assert "IR-18" in err and "2, 2, 2, 2" in err
    model = adaface.load(str(tmp_path / "a"))
    assert model.config.units == (2, 2, 2, 2) and len(model.body) == 8
    np.testing.assert_array_equal(model.body[2].res_layer[4].kernel[...],
                                  state["body.2.res_layer.4.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.body[2].shortcut_layer[0].kernel[...],
                                  state["body.2.shortcut_layer.0.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.output_layer[3].kernel[...], state["output_layer.3.weight"].numpy().T)
    np.testing.assert_array_equal(model.output_layer[4].var[...], state["output_layer.4.running_var"].numpy())
    np.testing.assert_array_equal(model.input_layer[2].negative_slope[...], state["input_layer.2.weight"].numpy())

    safetensors_torch = import_or_skip("safetensors.torch")
    st = tmp_path / "ir18.safetensors"
    bf16 = {"model." + k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    safetensors_torch.save_file(bf16 | {"head.kernel": torch.zeros(512, 2)}, st)
    rc, err = _convert(capsys, "--src", str(st), "--dst", str(tmp_path / "b"), "--dtype", "bf16")
    assert rc == 0, err
    model_b = adaface.load(str(tmp_path / "b"), param_dtype=jnp.bfloat16)
    assert model_b.output_layer[3].kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(model_b.output_layer[3].kernel[...], np.float32),
                                  bf16["model.output_layer.3.weight"].float().numpy().T)


# -------------------------------------------------------------------------- refusals and errors


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_unsafe_pickle_is_refused_unless_allowed(tmp_path, capsys, zipfile):
    ckpt = tmp_path / "custom.ckpt"
    torch.save(_lightning(_official_state("ir_18", fill=0.5), callbacks={"cb": CustomObject()}), ckpt,
               _use_new_zipfile_serialization=zipfile)
    rc, err = _convert(capsys, "--src", str(ckpt), "--dst", str(tmp_path / "out"))
    assert rc == 1
    assert str(ckpt) in err and "--allow-unsafe-pickle" in err and "CustomObject" in err
    assert not (tmp_path / "out").exists()
    rc, err = _convert(capsys, "--src", str(ckpt), "--dst", str(tmp_path / "out"), "--allow-unsafe-pickle")
    assert rc == 0, err
    assert "IR-18" in err


def _mutated(state: dict, change: str) -> dict:
    state = dict(state)
    if change == "missing":
        del state["body.5.res_layer.4.weight"]
    elif change == "shape":
        state["body.5.res_layer.4.weight"] = torch.zeros(256, 256, 3, 1)
    elif change == "unexpected":
        state["body.5.res_layer.6.weight"] = torch.zeros(3)
    elif change == "not_tensor":
        state["body.5.res_layer.4.weight"] = "hello"
    elif change == "integer":
        state["body.5.res_layer.4.weight"] = torch.zeros(256, 256, 3, 3, dtype=torch.int32)
    return state


@pytest.mark.parametrize("change, expected", [
    ("missing", r"missing tensor 'model\.body\.5\.res_layer\.4\.weight'"),
    ("shape", r"'model\.body\.5\.res_layer\.4\.weight' has shape \(256, 256, 3, 1\), expected \(256, 256, 3, 3\)"),
    ("unexpected", r"unexpected tensor 'model\.body\.5\.res_layer\.6\.weight'"),
    ("not_tensor", r"'model\.body\.5\.res_layer\.4\.weight' .*is a str, not a tensor"),
    ("integer", r"'model\.body\.5\.res_layer\.4\.weight' is int32, expected floating point"),
])
def test_bad_state_dict_names_file_and_key(tmp_path, capsys, change, expected):
    ckpt = tmp_path / "bad.ckpt"
    torch.save(_lightning(_mutated(_official_state("ir_18", fill=0.5), change)), ckpt)
    rc, err = _convert(capsys, "--src", str(ckpt), "--dst", str(tmp_path / "out"))
    assert rc == 1
    assert str(ckpt) in err
    assert re.search(expected, err), err
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [ckpt]  # nothing half-written


def test_bad_files(tmp_path, capsys):
    garbage = tmp_path / "notes.ckpt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    rc, err = _convert(capsys, "--src", str(garbage), "--dst", str(tmp_path / "o1"))
    assert rc == 1 and str(garbage) in err and "not a readable PyTorch checkpoint" in err

    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listing)
    rc, err = _convert(capsys, "--src", str(listing), "--dst", str(tmp_path / "o2"))
    assert rc == 1 and str(listing) in err and "holds a list" in err

    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    rc, err = _convert(capsys, "--src", str(other), "--dst", str(tmp_path / "o3"))
    assert rc == 1 and str(other) in err and "not an AdaFace IR checkpoint" in err

    odd = tmp_path / "odd.pt"
    torch.save({f"body.{i}.res_layer.0.weight": torch.zeros(2) for i in range(11)}, odd)
    rc, err = _convert(capsys, "--src", str(odd), "--dst", str(tmp_path / "o4"))
    assert rc == 1 and str(odd) in err and "11 body units" in err

    rc, err = _convert(capsys, "--src", str(tmp_path / "absent.ckpt"), "--dst", str(tmp_path / "o5"))
    assert rc == 1 and "absent.ckpt: no such file" in err

    (tmp_path / "exists").mkdir()
    rc, err = _convert(capsys, "--src", str(odd), "--dst", str(tmp_path / "exists"))
    assert rc == 1 and "already exists" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "list.pt", "notes.ckpt", "odd.pt", "other.pt"]


def test_load_rejects_other_family(tmp_path):
    weights.save(str(tmp_path / "vae"), "vae", {}, {"x": np.zeros(2, np.float32)})
    with pytest.raises(weights.WeightsError, match="expected 'adaface'"):
        adaface.load(str(tmp_path / "vae"))


# ------------------------------------------------------------------------------ embed_faces


@pytest.mark.parametrize("size", [512, 1024, 300, 100])
def test_identity_crop_matches_opencv_area(size):
    cv2 = import_or_skip("cv2")
    img = np.random.default_rng(size).uniform(-1, 1, (size, size, 3)).astype(np.float32)
    lo, hi = recognition.crop_bounds(size)
    assert (lo, hi) == {512: (32, 480), 1024: (64, 960), 300: (19, 281), 100: (6, 94)}[size]
    expected = cv2.resize(img[lo:hi, lo:hi], (112, 112), interpolation=cv2.INTER_AREA)
    ours = np.asarray(recognition.identity_crop(jnp.asarray(img[None])))[0]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    if size == 512:  # exact 4x4 mean pool
        np.testing.assert_allclose(ours, img[32:480, 32:480].reshape(112, 4, 112, 4, 3).mean((1, 3)), atol=1e-6)


def _read_rgb(path: Path) -> np.ndarray:
    cv2 = import_or_skip("cv2")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return (bgr[..., ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5


def test_embed_faces_on_real_faces(ir50):
    require(FACES, "real faces")
    cases = [sorted(p for p in (FACES / split).iterdir() if p.is_dir())[0] for split in SPLITS]
    # Image sizes differ (CelebA-Test-Ref references are 1024x1024): embed one image at a time.
    images = [_read_rgb(case / name) for case in cases for name in ("gt.jpg", "ref1.jpg")]
    assert {im.shape[0] for im in images} <= {512, 1024}
    outputs = [_embed(ir50, jnp.asarray(im[None])) for im in images]
    embedding = np.concatenate([np.asarray(e) for e, _ in outputs])
    norm = np.concatenate([np.asarray(n) for _, n in outputs])
    assert np.isfinite(embedding).all() and np.isfinite(norm).all() and (norm > 0).all()
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0, atol=1e-5)
    cos = embedding @ embedding.T
    same = np.array([cos[2 * i, 2 * i + 1] for i in range(len(cases))])  # gt vs ref1, same identity
    different = np.array([cos[2 * i, 2 * j] for i in range(len(cases)) for j in range(len(cases)) if i != j])
    assert np.all(np.abs(same) <= 1 + 1e-5) and np.all(np.abs(different) <= 1 + 1e-5)
    assert not np.allclose(embedding[0], embedding[2], atol=1e-3)  # different faces, different embeddings
    # The same pipeline by hand: crop 32:480, 4x4 mean pool, RGB -> BGR, model.
    by_hand = images[0][32:480, 32:480].reshape(112, 4, 112, 4, 3).mean((1, 3))[None, ..., ::-1]
    expected, expected_norm = nnx.jit(lambda m, x: m(x))(ir50, jnp.asarray(np.ascontiguousarray(by_hand)))
    np.testing.assert_allclose(embedding[:1], expected, atol=1e-5)
    np.testing.assert_allclose(norm[:1], expected_norm, rtol=1e-5)


@pytest.fixture(scope="module", params=["ir_18", "golden_ir_50"])
def any_model(request):
    """A randomly initialised IR-18, and the golden IR-50 (skipped without ../shared, failed under CI): both run,
    neither silently replaces the other."""
    if request.param == "golden_ir_50":
        return request.getfixturevalue("ir50")
    return adaface.AdaFace(adaface.AdaFaceConfig.from_arch("ir_18"), rngs=nnx.Rngs(0))


def test_embed_faces_is_differentiable(any_model):
    rgb = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 160, 160, 3)).astype(np.float32))
    anchor = jnp.asarray(np.random.default_rng(1).standard_normal((512,)).astype(np.float32))

    @nnx.jit
    def loss_grad(model, x):
        def loss(x):
            embedding, norm = adaface.embed_faces(model, x)
            return jnp.mean(1 - embedding @ anchor / jnp.linalg.norm(anchor)) + 1e-3 * jnp.mean(norm)
        return jax.value_and_grad(loss)(x)

    value, grad = loss_grad(any_model, rgb)
    assert grad.shape == rgb.shape
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
    assert float(jnp.abs(grad).max()) > 0
    border = np.asarray(grad)[:, :10]  # rows outside the 6.25% crop get no gradient
    assert not border.any() and np.asarray(grad)[:, 10:150].any()
