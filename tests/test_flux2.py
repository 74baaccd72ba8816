"""FLUX.2 transformer: parity with diffusers (both checkpoint layouts), LoRA vs peft, counts, converter errors."""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
import jax.numpy as jnp
from flax import nnx
from safetensors.torch import save_file

from helpers import rel_err
from convert import flux2 as convert_flux2
from iconface_jax import weights
from iconface_jax.models import flux2, lora

pytestmark = pytest.mark.parity

CFG = flux2.PRESETS["tiny"]
GRID = 4  # 4x4 latent tokens per image segment


def segment_ids(t: int, grid: int = GRID) -> np.ndarray:
    """RoPE ids (t, h, w, 0) of one image segment."""
    h, w = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.stack([np.full(grid * grid, t), h.ravel(), w.ravel(), np.zeros(grid * grid)], -1).astype(np.int64)


def make_inputs(batch: int = 2, n_txt: int = 8, seed: int = 0):
    """Text, scene, degraded and two reference segments with the RoPE ids of docs/design.md#hybrid-sequence."""
    rng = np.random.default_rng(seed)
    img_ids = np.concatenate([segment_ids(0), segment_ids(2), segment_ids(10), segment_ids(11)])
    txt_ids = np.stack([np.zeros(n_txt), np.zeros(n_txt), np.zeros(n_txt), np.arange(n_txt)], -1).astype(np.int64)
    x = rng.standard_normal((batch, len(img_ids), CFG.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((batch, n_txt, CFG.joint_attention_dim)).astype(np.float32)
    return x, ctx, img_ids, txt_ids


def torch_forward(model, x, ctx, t, img_ids, txt_ids):
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                    timestep=torch.from_numpy(t), img_ids=torch.from_numpy(img_ids),
                    txt_ids=torch.from_numpy(txt_ids), return_dict=False)[0]
    return out.numpy()


def to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The BFL single-file layout of a diffusers state dict (the converter's name map inverted)."""
    out = {}
    for key, value in state.items():
        src, slot, swapped = convert_flux2.bfl_source(key)
        if slot is not None:
            out.setdefault(src, [None] * 3)[slot] = value
        elif swapped:
            out[src] = torch.cat(value.chunk(2, dim=0)[::-1], dim=0)
        else:
            out[src] = value
    return {k: torch.cat(v, 0) if isinstance(v, list) else v for k, v in out.items()}


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**dataclasses.asdict(CFG)).float().eval()
    with torch.no_grad():  # norms start at one; randomise so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def converted(torch_model, tmp_path_factory):
    """The tiny model saved by diffusers and as a prefixed BFL single file, each converted."""
    root = tmp_path_factory.mktemp("flux2")
    torch_model.save_pretrained(root / "transformer", max_shard_size="200KB")  # sharded, with an index
    bfl = {convert_flux2.BFL_PREFIX + k: v.contiguous() for k, v in to_bfl(torch_model.state_dict()).items()}
    save_file(bfl, root / "flux-2-tiny.safetensors")
    for src, dst in [("transformer", "jax_diffusers"), ("flux-2-tiny.safetensors", "jax_bfl")]:
        assert convert_flux2.main(["--src", str(root / src), "--dst", str(root / dst), "--dtype", "float32"]) == 0
    return root


def test_bfl_copy_is_what_diffusers_reads(torch_model):
    state = {k: v.clone() for k, v in torch_model.state_dict().items()}
    back = convert_flux2_transformer_checkpoint_to_diffusers(to_bfl(state))
    assert set(back) == set(state)
    for k in state:
        torch.testing.assert_close(back[k], state[k], rtol=0, atol=0)


def test_sharded_checkpoint_has_index(converted):
    assert (converted / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()


@pytest.mark.parametrize("layout", ["jax_diffusers", "jax_bfl"])
def test_forward_matches_diffusers(torch_model, converted, layout):
    model = flux2.load(str(converted / layout))
    x, ctx, img_ids, txt_ids = make_inputs()
    for t in ([0.0, 0.35], [0.8, 1.0]):
        t = np.asarray(t, np.float32)
        want = torch_forward(torch_model, x, ctx, t, img_ids, txt_ids)
        got = np.asarray(model(x, ctx, t, img_ids, txt_ids))
        assert got.shape == want.shape == x.shape
        assert rel_err(got, want) < 1e-5


def test_jitted_forward_with_traced_ids_matches(torch_model, converted):
    model = flux2.load(str(converted / "jax_diffusers"))
    x, ctx, img_ids, txt_ids = make_inputs(seed=1)
    t = np.asarray([0.5, 0.25], np.float32)
    got = nnx.jit(lambda m, *a: m(*a))(model, x, ctx, t, img_ids, txt_ids)
    assert rel_err(got, torch_forward(torch_model, x, ctx, t, img_ids, txt_ids)) < 1e-4


def test_reference_cache_matches_diffusers_kv_mode(torch_model, converted):
    """Degraded and reference tokens cached at timestep 0 equal diffusers' Flux2 KV extract and cached modes."""
    from diffusers.models.transformers.transformer_flux2 import (Flux2KVAttnProcessor,
                                                                 Flux2KVParallelSelfAttnProcessor)
    kv_model = copy.deepcopy(torch_model)
    for block in kv_model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in kv_model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    x, ctx, img_ids, txt_ids = make_inputs()
    n = GRID * GRID
    scene, refs, scene_ids, ref_ids = x[:, :n], x[:, n:], img_ids[:n], img_ids[n:]
    t = torch.tensor([0.3, 0.9])
    common = dict(encoder_hidden_states=torch.from_numpy(ctx), timestep=t, txt_ids=torch.from_numpy(txt_ids),
                  return_dict=False)
    with torch.no_grad():  # diffusers puts the cached tokens first: [references; image]
        extracted, kv = kv_model(hidden_states=torch.from_numpy(np.concatenate([refs, scene], 1)),
                                 img_ids=torch.from_numpy(np.concatenate([ref_ids, scene_ids])),
                                 kv_cache_mode="extract", num_ref_tokens=refs.shape[1], ref_fixed_timestep=0.0,
                                 **common)
        cached = kv_model(hidden_states=torch.from_numpy(scene), img_ids=torch.from_numpy(scene_ids),
                          kv_cache=kv, kv_cache_mode="cached", **common)[0]

    model = flux2.load(str(converted / "jax_diffusers"))
    cache = model.cache_references(refs, ref_ids, 0.0)
    assert rel_err(cache.double[1][0], kv.get_double(1).k_ref.numpy()) < 1e-5
    assert rel_err(cache.single[-1][1], kv.get_single(len(kv.single_block_caches) - 1).v_ref.numpy()) < 1e-5
    got = np.asarray(model(scene, ctx, t.numpy(), scene_ids, txt_ids, cache=cache))
    assert rel_err(got, extracted.numpy()) < 1e-5
    assert rel_err(got, cached.numpy()) < 1e-5
    # Attending only among themselves is a real change: full attention over the same tokens differs.
    full = np.asarray(model(x, ctx, t.numpy(), img_ids, txt_ids))[:, :n]
    assert rel_err(full, got) > 1e-3


def test_lora_matches_peft(torch_model, converted):
    from peft import LoraConfig, inject_adapter_in_model

    model = flux2.load(str(converted / "jax_diffusers"))
    names = lora.add_lora(model, rank=4, alpha=8.0)
    rng = np.random.default_rng(3)
    layers = lora.linears(model)
    for name in names:  # non-zero factors on both sides
        layer = layers[name]
        layer.lora_a.set_value(rng.standard_normal(layer.lora_a.get_value().shape).astype(np.float32) * 0.2)
        layer.lora_b.set_value(rng.standard_normal(layer.lora_b.get_value().shape).astype(np.float32) * 0.2)
    reference = Flux2Transformer2DModel(**dataclasses.asdict(CFG)).float().eval()
    reference.load_state_dict(torch_model.state_dict())
    reference = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8.0, target_modules=names), reference)
    with torch.no_grad():
        for name in names:
            module = reference.get_submodule(name)
            module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(layers[name].lora_a[...]).T))
            module.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(layers[name].lora_b[...]).T))
    x, ctx, img_ids, txt_ids = make_inputs(seed=2)
    t = np.asarray([0.2, 0.7], np.float32)
    want = torch_forward(reference, x, ctx, t, img_ids, txt_ids)
    got = np.asarray(model(x, ctx, t, img_ids, txt_ids))
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, torch_forward(torch_model, x, ctx, t, img_ids, txt_ids)) > 1e-3  # LoRA did something
    merged = np.asarray(lora.merge_lora(model)(x, ctx, t, img_ids, txt_ids))
    assert lora.count(model) == 0
    assert rel_err(merged, want) < 1e-5


def test_lora_starts_as_identity(converted):
    model = flux2.load(str(converted / "jax_diffusers"))
    x, ctx, img_ids, txt_ids = make_inputs()
    t = np.asarray([0.5, 0.5], np.float32)
    before = np.asarray(model(x, ctx, t, img_ids, txt_ids))
    lora.add_lora(model, rank=4, alpha=4.0, targets=lora.DEFAULT_TARGETS + lora.FEED_FORWARD_TARGETS)
    np.testing.assert_array_equal(np.asarray(model(x, ctx, t, img_ids, txt_ids)), before)


def test_klein_parameter_counts():
    cfg = flux2.PRESETS["klein-base-4b"]
    assert flux2.count_params(cfg) == 3_875_544_576
    model = nnx.eval_shape(lambda: flux2.Flux2Transformer(cfg, rngs=nnx.Rngs(0)))
    lora.add_lora(model, rank=16, alpha=16.0)
    assert lora.count(model) == 18_677_760


def test_bad_lora_target(converted):
    model = flux2.load(str(converted / "jax_diffusers"))
    with pytest.raises(ValueError, match="to_nothing"):
        lora.add_lora(model, 4, 4.0, targets=("to_q", "to_nothing"))


# --- converter error discipline: each bad input names the file and key and writes nothing ---

def _write(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def _expect_error(capsys, src, dst, *needles):
    assert convert_flux2.main(["--src", str(src), "--dst", str(dst)]) == 1
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]


def test_converter_errors(torch_model, converted, tmp_path, capsys):
    state = {k: v.clone() for k, v in torch_model.state_dict().items()}
    dst = tmp_path / "out"
    missing = dict(state)
    del missing["transformer_blocks.1.attn.to_k.weight"]
    _expect_error(capsys, _write(tmp_path / "missing.safetensors", missing), dst,
                  "missing.safetensors", "transformer_blocks.1.attn.to_k.weight")
    _expect_error(capsys, _write(tmp_path / "extra.safetensors", {**state, "x_embedder.bias": torch.zeros(32)}), dst,
                  "extra.safetensors", "unexpected tensor 'x_embedder.bias'")
    bad = dict(state, **{"single_transformer_blocks.0.attn.to_out.weight": torch.zeros(32, 7)})
    _expect_error(capsys, _write(tmp_path / "shape.safetensors", bad), dst,
                  "shape.safetensors", "single_transformer_blocks.0.attn.to_out.weight", "(32, 7)")
    flux1 = {"double_blocks.0.img_mod.lin.weight": torch.zeros(4, 4)}
    _expect_error(capsys, _write(tmp_path / "flux1.safetensors", flux1), dst, "flux1.safetensors", "FLUX.1")
    good = _write(tmp_path / "good.safetensors", state)
    truncated = tmp_path / "cut.safetensors"  # a name without the word the message must hold
    truncated.write_bytes(good.read_bytes()[:-100])
    _expect_error(capsys, truncated, dst, "cut.safetensors", "(truncated?)")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    _expect_error(capsys, junk, dst, "junk.safetensors", "not a safetensors file")
    _expect_error(capsys, tmp_path / "nowhere.safetensors", dst, "nowhere.safetensors", "no such file")
    existing = converted / "jax_diffusers"
    before = sorted(os.listdir(existing))
    assert convert_flux2.main(["--src", str(good), "--dst", str(existing)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(os.listdir(existing)) == before


def test_bf16_checkpoint_converts(torch_model, tmp_path):
    src = tmp_path / "bf16"
    torch_model.to(torch.bfloat16).save_pretrained(src)
    torch_model.float()
    assert convert_flux2.main(["--src", str(src), "--dst", str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    model = flux2.load(str(tmp_path / "out"))
    want = torch_model.state_dict()["transformer_blocks.0.attn.to_q.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(model.transformer_blocks[0].attn.to_q.kernel[...]).T, want)


def test_converter_streams_in_chunks(converted, tmp_path, monkeypatch, partial_saves):
    """Written a chunk at a time (never the whole model in memory), the result equals the default conversion."""
    monkeypatch.setattr(weights, "CHUNK_BYTES", 64 * 1024)
    dst = tmp_path / "chunked"
    assert convert_flux2.main(["--src", str(converted / "transformer"), "--dst", str(dst), "--dtype", "float32"]) == 0
    assert len(partial_saves) > 3
    want = weights.named_params(flux2.load(str(converted / "jax_diffusers")))
    for key, var in weights.named_params(flux2.load(str(dst))).items():
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(want[key].get_value()))


def test_converted_config_round_trips(converted):
    with open(converted / "jax_bfl" / "config.json") as f:
        meta = json.load(f)
    assert meta["family"] == "flux2"
    assert flux2.Flux2Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}) == CFG


def test_adaln_zero_init_starts_every_block_as_identity():
    """DiT's adaLN-Zero: zero gates make each block the identity and the zero head outputs 0."""
    model = flux2.build(CFG, seed=1, init="adaln_zero")
    x, ctx, img_ids, txt_ids = make_inputs()
    t = np.asarray([0.3, 0.9], np.float32)
    c = model.conditioning(t, img_ids, txt_ids)
    img, txt = model.x_embedder(x), model.context_embedder(ctx)
    for block in model.transformer_blocks:
        img2, txt2, _ = block(img, txt, c.mod_img, c.mod_txt, c.rope)
        np.testing.assert_array_equal(np.asarray(img2), np.asarray(img))
        np.testing.assert_array_equal(np.asarray(txt2), np.asarray(txt))
    joint = np.concatenate([txt, img], axis=1)
    for block in model.single_transformer_blocks:
        np.testing.assert_array_equal(np.asarray(block(joint, c.mod_single, c.rope)[0]), joint)
    np.testing.assert_array_equal(np.asarray(model(x, ctx, t, img_ids, txt_ids)), 0.0)

    def loss(m):
        return jnp.sum(jnp.square(m(x, ctx, t, img_ids, txt_ids) - 1.0))
    grads = nnx.grad(loss)(model)
    # Only the output projection sees gradient at the first step (its input LN(h) is not zero; everything
    # before it is reached through its zero kernel); the gates follow once it has moved.
    assert float(jnp.abs(grads.proj_out.kernel[...]).max()) > 0
    for name in ("norm_out", "single_stream_modulation", "double_stream_modulation_img"):
        assert float(jnp.abs(getattr(grads, name).linear.kernel[...]).max()) == 0.0, name
    # The torch init differs: its output is not zero.
    assert float(np.abs(np.asarray(flux2.build(CFG, seed=1)(x, ctx, t, img_ids, txt_ids))).max()) > 0
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        flux2.build(CFG, init="xavier")
