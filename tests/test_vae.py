"""The FLUX.2 VAE against `diffusers.AutoencoderKLFlux2` and `Flux2KleinPipeline`, and its converter.

A tiny random diffusers VAE (group norms, BatchNorm running statistics randomised too) is saved with
`save_pretrained`, converted with `python -m convert.vae`, and compared in float32.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from flax import nnx
from safetensors.torch import save_file

from helpers import rel_err as rel
from convert import vae as convert_vae
from iconface_jax import weights
from iconface_jax.models import vae

pytestmark = pytest.mark.parity

P = Flux2KleinPipeline
TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4)


def nchw(x: np.ndarray) -> torch.Tensor:
    """NHWC array -> NCHW tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    """NCHW tensor -> NHWC array."""
    return x.detach().permute(0, 2, 3, 1).numpy()


def torch_vae(seed: int, groups: int) -> AutoencoderKLFlux2:
    """A tiny float32 diffusers VAE whose norms and BatchNorm statistics are random, not default."""
    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(**TINY, norm_num_groups=groups).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
                module.bias.copy_(0.3 * torch.randn_like(module.bias))
        model.bn.running_mean.copy_(0.5 * torch.randn_like(model.bn.running_mean))
        model.bn.running_var.copy_(0.2 + 2 * torch.rand_like(model.bn.running_var))
        model.bn.num_batches_tracked.fill_(7)
    return model


def convert(src: str, dst: str, *extra: str) -> int:
    """The converter's command line, float32 storage (exact comparisons)."""
    return convert_vae.main(["--src", src, "--dst", dst, "--dtype", "float32", *extra])


@pytest.fixture(scope="module")
def tvae() -> AutoencoderKLFlux2:
    return torch_vae(0, groups=8)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tvae) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vae")
    tvae.save_pretrained(str(root / "repo" / "vae"))
    assert convert(str(root / "repo"), str(root / "out")) == 0  # the repository root: its vae/ is used
    return {"root": str(root), "src": str(root / "repo" / "vae"), "dst": str(root / "out")}


@pytest.fixture(scope="module")
def jvae(dirs) -> vae.AutoencoderKLFlux2:
    return vae.load(dirs["dst"])


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Two non-square images (32 x 64) in [-1, 1], NHWC."""
    return np.random.default_rng(0).uniform(-1, 1, (2, 32, 64, 3)).astype(np.float32)


def test_default_config_is_flux2_and_counts_84m():
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLFlux2.__init__).parameters.items()}
    config = vae.DEFAULT
    for field in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                  "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
                  "batch_norm_eps", "patch_size", "decoder_block_out_channels"):
        assert getattr(config, field) == defaults[field], field
    assert vae.param_count(config) == 84_046_115
    assert vae.param_count(config, "encoder.") == 34_421_696
    assert vae.param_count(config, "decoder.") == 49_619_203
    assert config.token_channels == 128 and config.scale_factor == 8
    assert vae.token_grid(config, 512, 512) == (32, 32)


def test_converted_directory(dirs, tvae, jvae):
    stored = weights.read_config(dirs["dst"], vae.FAMILY)
    assert vae.VAEConfig.from_dict(stored) == vae.VAEConfig(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    params = weights.named_params(jvae, (nnx.Param, nnx.BatchStat))
    torch_keys = set(tvae.state_dict()) - {"bn.num_batches_tracked"}
    ours = {k.replace(".kernel", ".weight").replace(".scale", ".weight") for k in params}
    assert ours == torch_keys  # dotted paths mirror diffusers' names
    np.testing.assert_array_equal(params["bn.running_var"].get_value(), tvae.bn.running_var.numpy())

    # The default bf16 storage keeps the BatchNorm statistics in float32.
    assert convert_vae.main(["--src", dirs["src"], "--dst", os.path.join(dirs["root"], "bf16")]) == 0
    half = weights.named_params(vae.load(os.path.join(dirs["root"], "bf16")), (nnx.Param, nnx.BatchStat))
    np.testing.assert_array_equal(half["bn.running_mean"].get_value(), tvae.bn.running_mean.numpy())
    kernel = tvae.decoder.conv_in.weight.detach().to(torch.bfloat16).float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(half["decoder.conv_in.kernel"].get_value(), kernel)


def test_encode_decode_match_diffusers(tvae, jvae, images):
    with torch.no_grad():
        mean = tvae.encode(nchw(images)).latent_dist.mode()
        decoded = tvae.decode(mean).sample
    latents = jax.jit(jvae.encode)(jnp.asarray(images))
    assert latents.shape == (2, 16, 32, 4)  # two levels: latents at 1/2
    assert rel(latents, nhwc(mean)) < 1e-5
    out = jax.jit(jvae.decode)(jnp.asarray(nhwc(mean)))
    assert out.shape == images.shape
    assert rel(out, nhwc(decoded)) < 1e-5


def test_tokens_match_klein_pipeline(tvae, jvae, images):
    pipe = types.SimpleNamespace(vae=tvae, _patchify_latents=P._patchify_latents)
    with torch.no_grad():
        expected = P._pack_latents(P._encode_vae_image(pipe, nchw(images), None))
    tokens = jax.jit(lambda x: vae.encode_tokens(jvae, x))(jnp.asarray(images))
    assert tokens.shape == (2, 8 * 16, jvae.token_channels) and tokens.dtype == jnp.float32
    assert rel(tokens, expected.numpy()) < 1e-5

    # The pipeline's ending: unpack by position ids, BatchNorm de-normalisation, unpatchify, decode.
    noise = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 128, 16)).astype(np.float32))
    with torch.no_grad():
        ids = P._prepare_latent_ids(torch.zeros(2, 16, 8, 16))
        latents = P._unpack_latents_with_ids(noise, ids, 8, 16)
        bn_mean = tvae.bn.running_mean.view(1, -1, 1, 1)
        bn_std = torch.sqrt(tvae.bn.running_var.view(1, -1, 1, 1) + tvae.config.batch_norm_eps)
        latents = P._unpatchify_latents(latents * bn_std + bn_mean)
        expected_images = tvae.decode(latents).sample
    out = jax.jit(lambda t: vae.decode_tokens(jvae, t, 32, 64))(jnp.asarray(noise.numpy()))
    assert rel(out, nhwc(expected_images)) < 1e-5

    # Each helper alone, and the exact inverses.
    lat = np.random.default_rng(2).standard_normal((2, 6, 10, 4)).astype(np.float32)
    patched = vae.patchify(jnp.asarray(lat))
    np.testing.assert_array_equal(patched, nhwc(P._patchify_latents(nchw(lat))))
    np.testing.assert_array_equal(vae.unpatchify(patched), lat)
    np.testing.assert_array_equal(vae.pack(patched), P._pack_latents(nchw(np.asarray(patched))).numpy())
    np.testing.assert_array_equal(vae.unpack(vae.pack(patched), 3, 5), patched)
    np.testing.assert_allclose(vae.denormalize(jvae, vae.normalize(jvae, tokens)), tokens, rtol=1e-5, atol=1e-5)


def test_decode_gradients_match_torch(dirs, tvae, jvae):
    rng = np.random.default_rng(3)
    z = rng.standard_normal((1, 16, 32, 4)).astype(np.float32)
    w = rng.standard_normal((1, 32, 64, 3)).astype(np.float32)
    zt = nchw(z).requires_grad_(True)
    (tvae.decode(zt).sample * nchw(w)).sum().backward()
    expected = nhwc(zt.grad)

    def grad(model):
        return jax.jit(jax.grad(lambda z: jnp.sum(model.decode(z) * w)))(jnp.asarray(z))

    g = grad(jvae)
    assert np.all(np.isfinite(g))
    assert rel(g, expected) < 1e-5
    remat = vae.load(dirs["dst"], remat_decoder=True)
    assert remat.decoder.remat
    assert rel(grad(remat), g) < 1e-5  # float32 rounding: the rematerialised program fuses differently


def test_bfloat16_compute_stays_close(dirs, jvae, images):
    model = vae.load(dirs["dst"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    tokens = jax.jit(lambda x: vae.encode_tokens(model, x))(jnp.asarray(images))
    reference = jax.jit(lambda x: vae.encode_tokens(jvae, x))(jnp.asarray(images))
    assert tokens.dtype == jnp.float32 and rel(tokens, reference) < 5e-2
    out = jax.jit(lambda t: vae.decode_tokens(model, t, 32, 64))(tokens)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def to_bfl(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Black Forest Labs' names (flux2/src/flux2/autoencoder.py) for a diffusers state dict."""
    out = {}
    for key, value in state.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            key = ("encoder." if key.startswith("quant") else "decoder.") + key
        for i in range(levels):
            key = key.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            key = key.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            key = key.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")
            key = key.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")
        for old, new in [("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
                         ("mid_block.attentions.0.", "mid.attn_1."), ("attn_1.group_norm.", "attn_1.norm."),
                         ("attn_1.to_q.", "attn_1.q."), ("attn_1.to_k.", "attn_1.k."), ("attn_1.to_v.", "attn_1.v."),
                         ("attn_1.to_out.0.", "attn_1.proj_out."), ("conv_shortcut", "nin_shortcut"),
                         ("conv_norm_out", "norm_out")]:
            key = key.replace(old, new)
        if ".attn_1." in key and value.ndim == 2:
            value = value[:, :, None, None]  # BFL's attention projections are 1x1 convolutions
        out[key] = value.contiguous()
    return out


def test_bare_file_and_bfl_layout(tmp_path, images):
    """A lone safetensors file (config from shapes: needs the FLUX.2 32 norm groups) and BFL's layout."""
    model = torch_vae(1, groups=32)
    model.save_pretrained(str(tmp_path / "vae"))
    state = model.state_dict()
    assert convert(str(tmp_path / "vae"), str(tmp_path / "ref")) == 0

    os.makedirs(tmp_path / "bare")
    shutil.copy(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "bare" / "vae.safetensors")
    assert convert(str(tmp_path / "bare" / "vae.safetensors"), str(tmp_path / "from_bare")) == 0

    bfl = to_bfl(state, 2)
    for key in ["encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.mid.attn_1.q.weight", "encoder.mid.block_2.conv2.bias", "encoder.norm_out.weight",
                "encoder.quant_conv.weight", "decoder.post_quant_conv.bias", "decoder.up.0.block.0.nin_shortcut.weight",
                "decoder.up.1.upsample.conv.weight", "decoder.mid.attn_1.proj_out.weight", "bn.running_mean"]:
        assert key in bfl, key
    # diffusers' own LDM-VAE importer (BFL's names with the quant convs at the top level) inverts to_bfl.
    ldm = {k.replace("encoder.quant_conv", "quant_conv").replace("decoder.post_quant_conv", "post_quant_conv"): v
           for k, v in bfl.items()}
    back = convert_ldm_vae_checkpoint(ldm, dict(model.config))
    assert set(back) == set(state) - {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert all(torch.equal(back[k], state[k]) for k in back)
    os.makedirs(tmp_path / "bfl")
    save_file(bfl, str(tmp_path / "bfl" / "ae.safetensors"))
    assert convert(str(tmp_path / "bfl" / "ae.safetensors"), str(tmp_path / "from_bfl")) == 0

    ref = vae.load(str(tmp_path / "ref"))
    ref_params = weights.named_params(ref, (nnx.Param, nnx.BatchStat))
    for name in ("from_bare", "from_bfl"):
        got = vae.load(str(tmp_path / name))
        assert got.config == ref.config
        for key, var in weights.named_params(got, (nnx.Param, nnx.BatchStat)).items():
            np.testing.assert_array_equal(var.get_value(), ref_params[key].get_value(), err_msg=f"{name}: {key}")
    with torch.no_grad():
        expected = model.decode(model.encode(nchw(images)).latent_dist.mode()).sample
    assert rel(jax.jit(lambda x: got.decode(got.encode(x)))(jnp.asarray(images)), nhwc(expected)) < 1e-5


def _state(tvae) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tvae.state_dict().items()}


BAD = {
    "missing": lambda s, p: save_file({k: v for k, v in s.items() if k != "decoder.conv_out.bias"}, p),
    "unexpected": lambda s, p: save_file({**s, "decoder.extra.weight": torch.zeros(3)}, p),
    "misshaped": lambda s, p: save_file({**s, "encoder.conv_in.weight": torch.zeros(32, 3, 5, 5)}, p),
    "not_float": lambda s, p: save_file({**s, "decoder.conv_out.bias": torch.zeros(3, dtype=torch.int32)}, p),
}
WANT = {"missing": "'decoder.conv_out.bias'", "unexpected": "'decoder.extra.weight'",
        "misshaped": "'encoder.conv_in.weight'", "not_float": "'decoder.conv_out.bias'"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tensors_are_refused(tmp_path, capsys, dirs, tvae, case):
    src = tmp_path / "vae"
    os.makedirs(src)
    shutil.copy(os.path.join(dirs["src"], "config.json"), src)
    path = str(src / "diffusion_pytorch_model.safetensors")
    BAD[case](_state(tvae), path)
    assert convert(str(src), str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert path in err and WANT[case] in err, err
    assert sorted(os.listdir(tmp_path)) == ["vae"]  # nothing written, not even a partial directory


def test_bare_file_missing_shape_key_is_refused(tmp_path, capsys, tvae):
    path = str(tmp_path / "ae.safetensors")
    save_file({k: v for k, v in _state(tvae).items() if k != "decoder.conv_in.weight"}, path)
    assert convert(path, str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert path in err and "'decoder.conv_in.weight'" in err, err
    assert sorted(os.listdir(tmp_path)) == ["ae.safetensors"]


def test_truncated_and_foreign_files_are_refused(tmp_path, capsys, dirs):
    data = open(os.path.join(dirs["src"], "diffusion_pytorch_model.safetensors"), "rb").read()
    truncated = str(tmp_path / "cut.safetensors")  # a name without the word the message must hold
    with open(truncated, "wb") as f:
        f.write(data[:-1000])
    assert convert(truncated, str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert truncated in err and "(truncated?)" in err, err

    foreign = str(tmp_path / "notes.safetensors")
    with open(foreign, "w") as f:
        json.dump({"not": "a tensor file"}, f)
    assert convert(foreign, str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert foreign in err and "not a safetensors file" in err, err
    assert sorted(os.listdir(tmp_path)) == ["cut.safetensors", "notes.safetensors"]


def test_existing_destination_is_refused(tmp_path, capsys, dirs):
    dst = tmp_path / "out"
    os.makedirs(dst)
    (dst / "keep.txt").write_text("mine")
    assert convert(dirs["src"], str(dst)) == 1
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(dst) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_unwritable_destination_is_one_line(tmp_path, capsys, dirs):
    """A destination that cannot be written (here a file stands in the way: root writes everywhere else) is named
    in one line, not a traceback, and nothing is left behind."""
    (tmp_path / "file").write_text("")
    assert convert(dirs["src"], str(tmp_path / "file" / "out")) == 1
    assert f"destination {tmp_path}/file/out: cannot write in {tmp_path}/file" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["file"]


def test_load_refuses_other_families(tmp_path):
    weights.save(str(tmp_path / "w"), "flux2_transformer", {}, {"x": np.zeros(2, np.float32)})
    with pytest.raises(weights.WeightsError, match="flux2_transformer"):
        vae.load(str(tmp_path / "w"))
