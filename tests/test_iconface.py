"""IConFace pathways: hand-derivable cases (zero-init equals the backbone, no-reference mode, anchors)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import rel_err
from iconface_jax import sequence
from iconface_jax.models import flux2, iconface, lora

GRID = (4, 4)
N = GRID[0] * GRID[1]
CFG = iconface.IConFaceConfig(memory_tokens=8, memory_dim=16, pool_heads=2, xattn_rank=8, xattn_heads=2,
                              residual_rank=4)


def backbone():
    return flux2.build(flux2.PRESETS["tiny"], seed=1)


def inputs(refs: int, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = flux2.PRESETS["tiny"].in_channels
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    e_id = f(batch, 512)
    return dict(scene=f(batch, N, c), degraded=f(batch, N, c), references=f(batch, refs, N, c),
                text=f(batch, 6, flux2.PRESETS["tiny"].joint_attention_dim),
                sigma=jnp.asarray([0.3, 0.8][:batch], jnp.float32),
                e_id=e_id / jnp.linalg.norm(e_id, axis=-1, keepdims=True))


def backbone_reference(bb, x, refs):
    """The plain backbone over the hybrid sequence [scene; degraded; refs], scene tokens of the output."""
    b = x["scene"].shape[0]
    tokens = jnp.concatenate([x["scene"], x["degraded"], x["references"].reshape(b, -1, x["scene"].shape[-1])], 1)
    out = bb(tokens, x["text"], x["sigma"], sequence.image_segment_ids(*GRID, refs), sequence.text_ids(6))
    return out[:, :N]


@pytest.mark.parametrize("variant", sorted(iconface.VARIANTS))
@pytest.mark.parametrize("refs", [0, 2])
def test_untrained_model_is_the_backbone(variant, refs):
    bb = backbone()
    model = iconface.IConFace(bb, dataclasses.replace(CFG, variant=variant))
    x = inputs(refs)
    got = model(**x, grid=GRID)
    want = backbone_reference(bb, x, refs)
    assert got.shape == (2, N, 16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["concat", "full"])
@pytest.mark.parametrize("refs", [0, 2])
def test_untrained_cached_model_is_the_cached_backbone(variant, refs):
    """With the reference cache, zero side pathways leave the backbone with [degraded; refs] cached at sigma 0."""
    bb = backbone()
    model = iconface.IConFace(bb, dataclasses.replace(CFG, variant=variant, reference_cache=True))
    x = inputs(refs)
    b = x["scene"].shape[0]
    conditioning = jnp.concatenate([x["degraded"], x["references"].reshape(b, -1, x["scene"].shape[-1])], 1)
    ids = sequence.image_segment_ids(*GRID, refs)
    cache = bb.cache_references(conditioning, ids[N:], 0.0)
    want = bb(x["scene"], x["text"], x["sigma"], ids[:N], sequence.text_ids(6), cache=cache)
    np.testing.assert_allclose(np.asarray(model(**x, grid=GRID)), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_cached_conditions_do_not_depend_on_sigma_or_text():
    model = iconface.IConFace(backbone(), dataclasses.replace(CFG, reference_cache=True))
    perturb(model, seed=3)
    x = inputs(2)
    cond = model.condition(x["degraded"], x["references"], x["e_id"], grid=GRID)
    assert cond.tokens is None and len(cond.cache.double) == 2 and cond.cache.double[0][0].shape == (2, 3 * N, 2, 16)
    for sigma, text in [(x["sigma"], x["text"]), (x["sigma"][::-1], 2 * x["text"])]:
        step = model.velocity(x["scene"], text, sigma, cond)
        full = model(**dict(x, sigma=sigma, text=text), grid=GRID)
        np.testing.assert_allclose(np.asarray(step), np.asarray(full), rtol=1e-6, atol=1e-6)


def test_no_reference_mode_has_no_reference_segment():
    bb = backbone()
    model = iconface.IConFace(bb, CFG)
    perturb(model, seed=5)
    x0, x1 = inputs(0), inputs(1)
    x1 = dict(x1, **{k: x0[k] for k in ("scene", "degraded", "text", "sigma", "e_id")})
    out0 = model(**x0, grid=GRID)
    # Removing the reference tokens (not zeroing them) is what R = 0 means.
    zero_ref = model(**dict(x1, references=jnp.zeros_like(x1["references"])), grid=GRID)
    assert rel_err(out0, zero_ref) > 1e-4
    assert rel_err(out0, model(**x1, grid=GRID)) > 1e-4
    # References beyond what training used (R = 4) still run.
    assert model(**inputs(4), grid=GRID).shape == (2, N, 16)


def perturb(model, seed, scale=0.05):
    """Non-zero values for every side-pathway parameter (as after training)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, iconface.trainable)):
        var.set_value(jnp.asarray(scale * rng.standard_normal(var.get_value().shape), var.get_value().dtype))


@pytest.mark.parametrize("cached", [False, True])
def test_every_side_pathway_learns_from_zero_init(cached):
    bb = backbone()
    lora.add_lora(bb, 4, 4.0)
    model = iconface.IConFace(bb, dataclasses.replace(CFG, reference_cache=cached))
    x = inputs(2)
    graphdef, params, rest = nnx.split(model, iconface.trainable, ...)

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params, rest)(**x, grid=GRID) ** 2)

    grads = jax.grad(loss)(params)
    flat = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}
    for name in ["identity.psi_dbl.kernel", "identity.psi_sgl.kernel", "structure.w_in_up.kernel",
                 "memory_xattn.0.gamma", "memory_xattn.3.gamma"]:
        assert np.abs(flat[name]).max() > 0, name
    assert any(k.endswith("lora_b") and np.abs(v).max() > 0 for k, v in flat.items())


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_block_remat_keeps_values_and_gradients(policy):
    """Rematerialised blocks (with and without the reference cache) give the same loss and gradients."""
    x = inputs(2)

    def loss_and_grads(remat, cached):
        bb = flux2.build(flux2.PRESETS["tiny"], seed=1, remat=remat)
        lora.add_lora(bb, 4, 4.0)
        model = iconface.IConFace(bb, dataclasses.replace(CFG, reference_cache=cached))
        perturb(model, seed=2)
        graphdef, params, rest = nnx.split(model, iconface.trainable, ...)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(**x, grid=GRID) ** 2)
        return jax.value_and_grad(loss)(params), jax.make_jaxpr(loss)(params)

    for cached in (False, True):
        (want, want_grads), plain = loss_and_grads("none", cached)
        (got, grads), jaxpr = loss_and_grads(policy, cached)
        assert "checkpoint" in str(jaxpr) or "remat" in str(jaxpr)
        assert "remat" not in str(plain) and "checkpoint" not in str(plain)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_identity_anchor_hand_cases():
    d = jnp.asarray([[3.0, 4.0, 0.0]])
    np.testing.assert_allclose(iconface.identity_anchor(jnp.zeros((1, 0, 3)), d), [[0.6, 0.8, 0.0]], atol=1e-7)
    one = jnp.asarray([[[0.0, 2.0, 0.0]]])
    np.testing.assert_allclose(iconface.identity_anchor(one, d), [[0.0, 1.0, 0.0]], atol=1e-7)
    # softmax(log q / 1) = q / sum q: norms 2 and 6 weigh the directions 1/4 and 3/4.
    two = jnp.asarray([[[2.0, 0.0, 0.0], [0.0, 6.0, 0.0]]])
    want = np.asarray([0.25, 0.75, 0.0]) / np.linalg.norm([0.25, 0.75])
    np.testing.assert_allclose(iconface.identity_anchor(two, d)[0], want, atol=1e-6)
    # T -> large: plain average of directions.
    np.testing.assert_allclose(iconface.identity_anchor(two, d, temperature=1e6)[0], [2**-0.5, 2**-0.5, 0], atol=1e-5)


def test_smooth_keeps_constants_and_detail_route_sees_edges():
    const = jnp.ones((1, 16, 3))
    np.testing.assert_allclose(iconface.smooth(const, (4, 4)), const, atol=1e-7)
    ramp = jnp.arange(16.0).reshape(1, 16, 1)
    assert float(jnp.abs(ramp - iconface.smooth(ramp, (4, 4))).max()) > 0


def test_different_degraded_grid_is_resized():
    bb = backbone()
    model = iconface.IConFace(bb, CFG)
    perturb(model, seed=2)
    x = inputs(1)
    small = x["degraded"].reshape(2, 4, 4, -1)[:, ::2, ::2].reshape(2, 4, -1)
    assert model(**dict(x, degraded=small), grid=GRID, degraded_grid=(2, 2)).shape == (2, N, 16)


def test_conditions_of_the_wrong_shape_are_named():
    """References without their R axis, of another grid or channel count, and degraded tokens off their grid
    fail with the shapes named (not an opaque reshape or concatenate error deep in the model)."""
    model = iconface.IConFace(backbone(), CFG)
    x = inputs(1)
    for bad in (x["references"][:, 0], x["references"][:, :, :-1], x["references"][..., :-1]):
        with pytest.raises(ValueError, match=r"reference tokens of shape \(" + ", ".join(map(str, bad.shape))):
            model(**dict(x, references=bad), grid=GRID)
    with pytest.raises(ValueError, match="degraded tokens of shape"):
        model(**dict(x, degraded=x["degraded"][:, :-1]), grid=GRID)


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        iconface.IConFaceConfig(variant="two_route")


def test_identity_anchor_order_invariant_and_equal_norms_give_the_mean():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    d = jnp.ones((2, 8))
    np.testing.assert_allclose(iconface.identity_anchor(z, d), iconface.identity_anchor(z[:, ::-1], d), atol=1e-6)
    unit = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    mean = unit.mean(1)
    np.testing.assert_allclose(iconface.identity_anchor(3.0 * unit, d), mean / jnp.linalg.norm(mean, axis=-1,
                                                                                                 keepdims=True),
                               atol=1e-6)


def test_clean_prediction_is_the_velocity_of_the_predicted_tokens():
    """prediction="clean" reads the same network output as x0 and returns (z - x0) / max(sigma, floor)."""
    model = iconface.IConFace(backbone(), CFG)
    perturb(model, seed=4)
    x = dict(inputs(1), sigma=jnp.asarray([0.02, 0.6], jnp.float32))  # one sigma under the 0.05 floor
    raw = np.asarray(model(**x, grid=GRID), np.float64)  # the velocity model's output is the network's output
    model.config = dataclasses.replace(CFG, prediction="clean", clean_sigma_floor=0.05)
    got = np.asarray(model(**x, grid=GRID), np.float64)
    z = np.asarray(x["scene"], np.float64)
    want = np.stack([(z[0] - raw[0]) / 0.05, (z[1] - raw[1]) / 0.6])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        dataclasses.replace(CFG, prediction="noise")


@pytest.mark.parametrize("cached", [False, True])
def test_memory_readers_are_the_named_image_tokens(cached, monkeypatch):
    """`image`: scene, degraded and reference tokens read the memory after every block (cached ones in the cache
    pass); `scene`: the scene tokens alone. Recorded from the cross-attention's own calls."""
    seen = []
    call = iconface.MemoryCrossAttention.__call__
    monkeypatch.setattr(iconface.MemoryCrossAttention, "__call__",
                        lambda self, h, memory: (seen.append(h.shape[1]), call(self, h, memory))[1])
    refs, blocks = 2, 2 + 2  # the tiny preset: 2 double and 2 single blocks
    outputs = {}
    for readers in ("scene", "image"):
        model = iconface.IConFace(backbone(), dataclasses.replace(CFG, memory_readers=readers, reference_cache=cached))
        perturb(model, seed=6, scale=0.5)  # large enough that the degraded tokens' reads reach the scene
        seen.clear()
        outputs[readers] = np.asarray(model(**inputs(refs), grid=GRID))
        if readers == "scene":
            assert seen == [N] * blocks
        elif cached:  # the cache pass reads once for [degraded; refs], then the scene at the step
            assert seen == [(1 + refs) * N] * blocks + [N] * blocks
        else:
            assert seen == [(2 + refs) * N] * blocks
    assert rel_err(outputs["image"], outputs["scene"]) > 1e-4


def test_smooth_is_the_binomial_blur_with_replicated_edges():
    """smooth() against a hand computation: [1, 2, 1] / 4 per axis, edge rows and columns repeated."""
    x = np.arange(12, dtype=np.float64).reshape(3, 4) ** 2
    padded = np.pad(x, 1, mode="edge")
    k = np.array([1.0, 2.0, 1.0]) / 4
    want = sum(k[i] * k[j] * padded[i:i + 3, j:j + 4] for i in range(3) for j in range(3))
    got = iconface.smooth(jnp.asarray(x, jnp.float32).reshape(1, 12, 1), (3, 4))
    np.testing.assert_allclose(np.asarray(got).reshape(3, 4), want, rtol=1e-6)


@pytest.mark.parametrize("cached", [False, True])
def test_rope_ids_are_the_table_of_design_md(cached, monkeypatch):
    """The RoPE ids the backbone receives, against the table of docs/design.md#hybrid-sequence written out: text
    (0, 0, 0, l), scene (0, h, w, 0), degraded (2, h, w, 0), reference r (10 + r, h, w, 0), on a 2 x 8 grid (rows
    then columns).
    With the reference cache, [degraded; references] get theirs in the cache pass (no text) and the scene at the
    step."""
    seen = []
    real = flux2.Flux2Transformer.conditioning
    def recording(self, timestep, img_ids, txt_ids):
        seen.append((np.asarray(img_ids).tolist(), np.asarray(txt_ids).tolist()))
        return real(self, timestep, img_ids, txt_ids)

    monkeypatch.setattr(flux2.Flux2Transformer, "conditioning", recording)
    model = iconface.IConFace(backbone(), dataclasses.replace(iconface.IConFaceConfig(
        memory_tokens=8, memory_dim=16, pool_heads=2, xattn_rank=8, xattn_heads=2, residual_rank=4),
        reference_cache=cached))
    jax.eval_shape(lambda x: model(**x, grid=(2, 8)), inputs(2))  # ids are static: tracing sees them all

    def segment(t):
        return [[t, h, w, 0] for h in range(2) for w in range(8)]

    text = [[0, 0, 0, i] for i in range(6)]
    scene, conditioning = segment(0), segment(2) + segment(10) + segment(11)
    assert seen == ([(conditioning, []), (scene, text)] if cached else [(scene + conditioning, text)])


@pytest.mark.parametrize("text_len", [0, 6])
def test_identity_deltas_shift_the_image_modulations(text_len, monkeypatch):
    """The identity deltas equal a backbone whose image-modulation heads output the shared modulation plus the delta:
    the double-stream image head always; the single-stream head (shared by text) when there is no text. With text,
    the single-stream delta stays at zero here, so text is left untouched by construction."""
    bb = backbone()
    model = iconface.IConFace(bb, dataclasses.replace(CFG, variant="id"))
    rng = np.random.default_rng(8)
    shifted_heads = (model.identity.psi_dbl,) + ((model.identity.psi_sgl,) if not text_len else ())
    for layer in (model.identity.phi_global, *shifted_heads):
        layer.kernel.set_value(jnp.asarray(0.3 * rng.standard_normal(layer.kernel.shape), jnp.float32))
    x = inputs(1)
    x["text"] = x["text"][:, :text_len]
    got = np.asarray(model(**x, grid=GRID))
    b = x["scene"].shape[0]
    tokens = jnp.concatenate([x["scene"], x["degraded"], x["references"].reshape(b, -1, x["scene"].shape[-1])], 1)

    def backbone_out():
        return np.asarray(bb(tokens, x["text"], x["sigma"], sequence.image_segment_ids(*GRID, 1),
                             sequence.text_ids(text_len))[:, :N])

    assert rel_err(got, backbone_out()) > 1e-3  # the deltas matter
    delta_double, delta_single = model.identity(x["e_id"])
    shifted = {id(bb.double_stream_modulation_img): delta_double, id(bb.single_stream_modulation): delta_single}
    real = flux2.Modulation.__call__
    monkeypatch.setattr(flux2.Modulation, "__call__", lambda self, temb: real(self, temb) + shifted.get(id(self), 0))
    np.testing.assert_allclose(got, backbone_out(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cached", [False, True])
def test_memory_reads_the_image_tokens_at_their_offsets(cached, monkeypatch):
    """In the default configuration (every image token reads), with the backbone's blocks made identities (zero
    modulations: no attention or MLP residual), the memory reads are the only change to the tokens: each read's
    input is the token segment written out from the embedded [scene; degraded; references] and the previous reads,
    and the scene tokens' reads alone move the output, by far (were the scene not read, it would not move)."""
    real = flux2.Modulation.__call__
    monkeypatch.setattr(flux2.Modulation, "__call__", lambda self, temb: jnp.zeros_like(real(self, temb)))
    calls = []
    call = iconface.MemoryCrossAttention.__call__
    monkeypatch.setattr(iconface.MemoryCrossAttention, "__call__",
                        lambda self, h, memory: calls.append((self, h, call(self, h, memory))) or calls[-1][2])
    model = iconface.IConFace(backbone(), dataclasses.replace(CFG, reference_cache=cached))
    assert model.config.memory_readers == iconface.IConFaceConfig().memory_readers == "image"
    rng = np.random.default_rng(3)
    for xattn in model.memory_xattn:
        xattn.gamma.set_value(jnp.asarray(3 * rng.standard_normal(xattn.gamma.shape), jnp.float32))
    x, refs, blocks = inputs(2), 2, 2 + 2  # the tiny preset: 2 double and 2 single blocks
    with_memory = np.asarray(model(**x, grid=GRID))

    b, c = x["scene"].shape[0], x["scene"].shape[-1]
    embedded = model.backbone.x_embedder(
        jnp.concatenate([x["scene"], x["degraded"], x["references"].reshape(b, -1, c)], 1))
    # Which tokens read, pass by pass: all of them in one pass, or [degraded; refs] in the cache pass, then the scene.
    passes = [embedded[:, N:], embedded[:, :N]] if cached else [embedded]
    assert len(calls) == blocks * len(passes) and embedded.shape[1] == (2 + refs) * N
    for p, tokens in enumerate(passes):
        for i in range(blocks):
            xattn, h, out = calls[p * blocks + i]
            assert xattn is model.memory_xattn[i]
            np.testing.assert_allclose(np.asarray(h), np.asarray(tokens), rtol=1e-5, atol=1e-5, err_msg=f"{p}, {i}")
            tokens = out

    for xattn in model.memory_xattn:
        xattn.gamma.set_value(jnp.zeros(xattn.gamma.shape, jnp.float32))
    assert rel_err(with_memory, np.asarray(model(**x, grid=GRID))) > 0.05
