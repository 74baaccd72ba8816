"""Export to PyTorch: the LoRA through diffusers/peft loaders, the side pathways through convert/torch_pathways.py,
the whole IConFace velocity against the JAX model (tiny models in-process, and the CLI on a trained toy run)."""
from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from flax import nnx
from safetensors import safe_open

from helpers import ROOT, rel_err
from convert import export
from convert import torch_pathways as tp
from iconface_jax import sampling, workdir
from iconface_jax import face_system
from iconface_jax.models import iconface, lora

pytestmark = pytest.mark.parity


def demo_config(variant: str):
    """The demo config at toy size, LoRA alpha 2 x rank (so a lost scale would show)."""
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.data.resolution = 32
    cfg.model.lora.alpha = 16.0
    cfg.model.iconface.variant = variant
    return cfg


def trained_like(system, seed: int = 0):
    """Non-zero LoRA factors and side-pathway parameters, as after training."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(system.model, iconface.trainable)):
        shape = var.get_value().shape
        var.set_value(jnp.asarray(0.05 * rng.standard_normal(shape), jnp.float32))
    return system


def inputs(system, refs: int, seed: int = 0, grid=(4, 4)):
    """Random tokens, text, sigmas and a unit e_id for the system's model, as numpy arrays."""
    rng = np.random.default_rng(seed)
    bb = system.model.backbone.config
    n = grid[0] * grid[1]
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    e_id = f(2, 512)
    return dict(scene=f(2, n, bb.in_channels), degraded=f(2, n, bb.in_channels),
                references=f(2, refs, n, bb.in_channels), text=f(2, 8, bb.joint_attention_dim),
                sigma=np.asarray([0.3, 0.9], np.float32), e_id=e_id / np.linalg.norm(e_id, axis=-1, keepdims=True))


def jax_velocity(system, x, grid=(4, 4)):
    return np.asarray(system.model(**{k: jnp.asarray(v) for k, v in x.items()}, grid=grid))


def torch_velocity(transformer, side, x, grid=(4, 4)):
    return tp.iconface_velocity(transformer, side, **{k: torch.from_numpy(v) for k, v in x.items()}, grid=grid).numpy()


def load_transformer(path):
    return Flux2Transformer2DModel.from_pretrained(path).float().eval()


@pytest.mark.parametrize("variant, cached, options", [(v, False, {}) for v in sorted(iconface.VARIANTS)]
                         + [("full", True, {}), ("concat", True, {}), ("full", False, {"memory_readers": "scene"}),
                            ("full", True, {"memory_readers": "scene"}), ("full", False, {"prediction": "velocity"})])
def test_export_matches_jax_through_peft(variant, cached, options, tmp_path):
    """PyTorch (diffusers + peft; the reference cache as diffusers' KV extract pass) equals JAX."""
    cfg = demo_config(variant)
    cfg.model.iconface.reference_cache = cached
    cfg.model.iconface.update(options)
    system = trained_like(face_system.build(cfg))
    out = tmp_path / "export"
    export.export(system, cfg, step=0, out=str(out), merged=True)

    transformer = load_transformer(out / "base_transformer")
    transformer.load_lora_adapter(str(out / export.LORA_FILE))
    side = tp.IConFaceSide.from_file(str(out / export.SIDE_FILE)).eval()
    x = inputs(system, refs=2)
    want = jax_velocity(system, x)
    assert rel_err(torch_velocity(transformer, side, x), want) < 1e-5
    assert rel_err(torch_velocity(load_transformer(out / "merged_transformer"), side, x), want) < 1e-5
    # The adapter and its alpha / r scale are really in play.
    assert rel_err(torch_velocity(load_transformer(out / "base_transformer"), side, x), want) > 1e-3
    np.testing.assert_array_equal(side.prompt_embeds.numpy(), np.asarray(system.prompt[...]))
    if cached:  # the cache mode is really on, on both sides
        cfg.model.iconface.reference_cache = False
        assert rel_err(jax_velocity(trained_like(face_system.build(cfg)), x), want) > 1e-4  # equal would be ~1e-7


def test_side_file_schema(tmp_path):
    cfg = demo_config("full")
    system = face_system.build(cfg)
    export.export(system, cfg, step=7, out=str(tmp_path / "e"))
    with safe_open(str(tmp_path / "e" / export.SIDE_FILE), "pt") as f:
        info = json.loads(f.metadata()["iconface"])
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    d, c = info["hidden_size"], info["config"]
    assert info["step"] == 7 and info["schema_version"] == export.SCHEMA_VERSION and info["train_base"]
    assert shapes["identity.phi_global.weight"] == (d, 512)
    assert shapes["identity.psi_dbl.weight"] == (6 * d, d)
    assert shapes["structure.w_in_down.weight"] == (c["residual_rank"], d)
    assert shapes["structure.pool_detail.queries"] == (c["memory_tokens"] // 2, c["memory_dim"])
    n_blocks = info["num_layers"] + info["num_single_layers"]
    assert shapes[f"memory_xattn.{n_blocks - 1}.to_out.weight"] == (d, c["xattn_rank"])
    assert f"memory_xattn.{n_blocks}.gamma" not in shapes
    with safe_open(str(tmp_path / "e" / export.LORA_FILE), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = set(f.keys())
    assert meta["transformer.r"] == 8 and meta["transformer.lora_alpha"] == 8.0  # alpha / r folded into lora_B
    assert len(keys) == 2 * len(meta["transformer.target_modules"])
    assert "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight" in keys
    config = json.loads((tmp_path / "e" / "base_transformer" / "config.json").read_text())
    assert config["_class_name"] == "Flux2Transformer2DModel"


def test_export_cli_on_a_trained_run(toy_run, tmp_path):
    out = tmp_path / "export"
    assert export.main(["--checkpoint", str(toy_run), "--out", str(out), "--merged"]) == 0
    system, _, _ = workdir.load(str(toy_run))
    # The pipeline's own loader, given the directory (it picks pytorch_lora_weights.safetensors).
    transformer = load_transformer(out / "base_transformer")
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                              tokenizer=None, transformer=transformer)
    pipe.load_lora_weights(str(out))
    side = tp.IConFaceSide.from_file(str(out / export.SIDE_FILE)).eval()
    for refs in (0, 1):
        x = inputs(system, refs, seed=refs)
        want = jax_velocity(system, x)
        assert rel_err(torch_velocity(transformer, side, x), want) < 1e-5
        assert rel_err(torch_velocity(load_transformer(out / "merged_transformer"), side, x), want) < 1e-5
    with safe_open(str(out / export.SIDE_FILE), "pt") as f:
        assert json.loads(f.metadata()["iconface"])["step"] == 6


def test_export_refuses_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert export.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)]) == 1  # before loading
    assert "already exists" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    assert "config.json is missing" in capsys.readouterr().err
    cfg = demo_config("concat")
    system = face_system.build(cfg)
    lora.merge_lora(system.model.backbone)  # no adapters left
    with pytest.raises(ValueError, match="no LoRA"):
        export.export(system, cfg, 0, str(tmp_path / "none"))
    assert sorted(os.listdir(tmp_path)) == ["exists"]


@pytest.mark.parametrize("to", [(4, 4), (6, 8), (2, 3)])
def test_token_resampling_matches_jax(to):
    x = np.random.default_rng(1).standard_normal((2, 16, 5)).astype(np.float32)
    got = tp.resize_tokens(torch.from_numpy(x), (4, 4), to).numpy()
    np.testing.assert_allclose(got, np.asarray(iconface.resize_tokens(jnp.asarray(x), (4, 4), to)), atol=1e-6)
    np.testing.assert_allclose(tp.smooth(torch.from_numpy(x), (4, 4)).numpy(),
                               np.asarray(iconface.smooth(jnp.asarray(x), (4, 4))), atol=1e-6)
    z = np.random.default_rng(2).standard_normal((2, 3, 512)).astype(np.float32)
    np.testing.assert_allclose(tp.identity_anchor(torch.from_numpy(z), torch.from_numpy(z[:, 0])).numpy(),
                               np.asarray(iconface.identity_anchor(jnp.asarray(z), jnp.asarray(z[:, 0]))), atol=1e-6)


def test_restore_reuses_conditions_across_steps_and_branches():
    """restore() computes the conditions (here the reference cache) once; stepping the full model equals it."""
    cfg = demo_config("full")
    cfg.model.iconface.reference_cache = True
    system = trained_like(face_system.build(cfg))
    rng = np.random.default_rng(0)
    deg = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    refs = jnp.asarray(rng.uniform(-1, 1, (2, 2, 32, 32, 3)), jnp.float32)
    key = jax.random.PRNGKey(0)
    got = sampling.restore_faces(system, deg, refs, key, steps=3, guidance=2.0)

    x_deg, x_refs, e_id = system.encode(deg), system.encode(refs), system.anchor(deg, refs)
    text = jnp.concatenate([jnp.broadcast_to(system.prompt[...], (2, *system.prompt.shape)),
                            jnp.broadcast_to(system.empty[...], (2, *system.empty.shape))])
    twice = lambda a: jnp.concatenate([a, a])
    full = lambda z2, s2: system.model(z2, twice(x_deg), twice(x_refs), text, s2, twice(e_id), grid=(4, 4))
    z0 = sampling.sample(full, jax.random.normal(key, x_deg.shape), sampling.schedule(3, x_deg.shape[1]), 2.0)
    want = jnp.clip(system.decode(z0, 32, 32), -1, 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
