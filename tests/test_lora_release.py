"""The IConFace authors' released model against theirs, output for output, and the LoRA importer's refusals.

Their code is `flux_restoration` in ../shared/reference (imported from there). On tiny random weights in float32
(the sizes of its README): their BFL transformer state dict through `convert.flux2`, their LoRA file through
`convert.lora` (loaded as `model.lora_init` of the paper's concat config) and their `AutoEncoder` through
`convert.vae` give their `Flux2` + `inject_lora` velocity on [scene; degraded; refs] and their `sample_image`
result from the same noise.
"""
from __future__ import annotations

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from safetensors.torch import save_file

from helpers import ROOT, rel_err, their_tiny_flux2, write_config
from convert import export
from convert import flux2 as convert_flux2
from convert import lora as convert_lora
from convert import vae as convert_vae
from convert.safetensors_file import write_safetensors
from iconface_jax import config, restore, sampling, sequence, text, weights, workdir
from iconface_jax import face_system
from iconface_jax.models import flux2, lora, vae

pytestmark = pytest.mark.parity

RANK, ALPHA, GRID, SIZE, LENGTH = 4, 8.0, 4, 64, 8  # 64 px images: 4x4 tokens of 128 channels
PROMPT = "restore a high quality portrait photo of a person, natural skin, detailed face"


@pytest.fixture(scope="module")
def ref(shared_dir):
    """Their package; `torchvision` (used only by `preprocess_image`, and not loadable beside CPU torch) stubbed
    while it is imported, then removed."""
    stub = types.ModuleType("torchvision")
    stub.transforms = types.ModuleType("torchvision.transforms")
    sys.modules["torchvision"], path = stub, str(shared_dir / "reference")
    sys.path.insert(0, path)
    try:
        from flux_restoration import autoencoder, inference, model, utils
        from flux_restoration import lora as their_lora
    finally:
        sys.path.remove(path)
        del sys.modules["torchvision"]
    return types.SimpleNamespace(autoencoder=autoencoder, inference=inference, model=model, utils=utils,
                                 lora=their_lora)


def their_text_encoder(prompts: list[str]) -> torch.Tensor:
    """The text encoder replaced by a fixed function: (B, LENGTH, 32) embeddings, one per distinct prompt."""
    return torch.stack([torch.randn(LENGTH, 32, generator=torch.Generator().manual_seed(len(p))) for p in prompts])


def randomise_norms(model: torch.nn.Module) -> None:
    """Norm scales and affines and BatchNorm statistics start at defaults; randomise so their mapping is tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "scale" in name):
                p.copy_(1 + 0.2 * torch.randn_like(p)) if name.endswith(("weight", "scale")) else p.normal_(0, 0.2)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.2, 2.0)


@pytest.fixture(scope="module")
def release(ref, tmp_path_factory):
    """Their tiny transformer with a random flux2_klein LoRA and AutoEncoder, saved as they save them, converted."""
    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    transformer = their_tiny_flux2(ref).eval()
    randomise_norms(transformer)
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, root / "flux-2-tiny.safetensors")
    ref.lora.inject_lora(transformer, "flux2_klein", rank=RANK, alpha=ALPHA)
    with torch.no_grad():  # B starts at zero: make the update matter
        for _, module in ref.lora.iter_lora_modules(transformer):
            module.lora_B.normal_(0, 0.05)
    ref.lora.save_lora_checkpoint(transformer, root / "authors",
                                  {"lora_target_preset": "flux2_klein", "lora_rank": RANK, "lora_alpha": ALPHA})
    ae = ref.autoencoder.AutoEncoder(ref.autoencoder.AutoEncoderParams(
        resolution=SIZE, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=32)).eval()
    randomise_norms(ae)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, root / "ae.safetensors")

    for module, src, dst in [(convert_flux2, "flux-2-tiny.safetensors", "transformer"),
                             (convert_vae, "ae.safetensors", "vae"),
                             (convert_lora, "authors/lora_weights.safetensors", "lora")]:
        assert module.main(["--src", str(root / src), "--dst", str(root / dst), "--dtype", "float32"]) == 0
    prompt, empty = their_text_encoder([PROMPT, ""]).numpy()
    text.save_prompt_embeddings(str(root / "prompt.npz"), prompt, empty, prompt_text=PROMPT, layers=[0],
                                max_length=LENGTH, encoder_dtype="float32")
    return types.SimpleNamespace(root=root, transformer=transformer, ae=ae)


def paper_config(release, variant: str = "concat"):
    """configs/iconface_klein4b.py:<variant> at the release's tiny sizes, starting from the converted LoRA."""
    cfg = config.load(f"{ROOT / 'configs' / 'iconface_klein4b.py'}:{variant}")
    m = cfg.model
    m.weights, m.precision, m.lora_init = str(release.root / "transformer"), "float32", str(release.root / "lora")
    m.lora.rank, m.lora.alpha = RANK, ALPHA
    m.autoencoder.weights, m.text.embeddings = str(release.root / "vae"), str(release.root / "prompt.npz")
    m.face_encoder.update(weights="", units=(1, 1, 1, 1), channels=(8, 8, 16, 16))
    return cfg


@pytest.fixture(scope="module")
def system(release):
    return face_system.build(paper_config(release))


def tokens(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) latents -> (B, H*W, C) tokens in their packing order."""
    return x.flatten(2).transpose(1, 2).numpy()


def test_velocity_matches_theirs(ref, release, system):
    rng = torch.Generator().manual_seed(1)
    scene, degraded = torch.randn(1, 128, GRID, GRID, generator=rng), torch.randn(1, 128, GRID, GRID, generator=rng)
    refs = torch.randn(1, 2, 128, GRID, GRID, generator=rng)
    u = ref.utils
    packed, ids = u.pack_latents(scene)
    deg_seq, deg_ids = u.build_image_condition_ids(degraded, time_offset=2)
    ref_seq, ref_ids, _ = u.build_grouped_image_condition_ids(refs, time_offset=10)
    ctx, ctx_ids = u.pack_text(their_text_encoder([PROMPT]))
    with torch.no_grad():
        want = release.transformer(x=torch.cat([packed, deg_seq, ref_seq], 1),
                                   x_ids=torch.cat([ids, deg_ids, ref_ids], 1), timesteps=torch.tensor([0.6]),
                                   ctx=ctx, ctx_ids=ctx_ids, guidance=None)[:, :GRID**2]
    # Our sequence's RoPE ids are theirs.
    np.testing.assert_array_equal(sequence.image_segment_ids(GRID, GRID, 2), torch.cat([ids, deg_ids, ref_ids], 1)[0])
    np.testing.assert_array_equal(sequence.text_ids(LENGTH), ctx_ids[0])

    def velocity(model, scene, degraded, refs, ctx):
        cond = model.condition(degraded, refs, grid=(GRID, GRID))
        return model.velocity(scene, ctx, jnp.asarray([0.6]), cond)
    got = nnx.jit(velocity)(system.model, packed.numpy(), tokens(degraded), tokens(refs[0])[None], ctx.numpy())
    assert rel_err(got, want.numpy()) < 1e-5


class Recorder:
    """Their AutoEncoder, keeping what `sample_image` decodes and what decoding gives."""

    def __init__(self, ae):
        self.ae, self.encode = ae, ae.encode

    def decode(self, z):
        self.latents, self.image = z, self.ae.decode(z)
        return self.image


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("num_refs", [0, 1, 3])
def test_restoration_matches_sample_image(ref, release, system, num_refs):
    rng = np.random.default_rng(num_refs)
    degraded = rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    refs = rng.uniform(-1, 1, (1, num_refs, SIZE, SIZE, 3)).astype(np.float32)
    recorder, seed = Recorder(release.ae), 7 + num_refs
    ref.inference.sample_image(release.transformer, recorder, their_text_encoder, {"guidance_distilled": False},
                               PROMPT, SIZE, 12, 4.0, seed, torch.device("cpu"), torch.float32, "no",
                               condition_image=nchw(degraded)[0], reference_image=nchw(refs[0]) if num_refs else None)
    noise = torch.randn((1, 128, GRID, GRID), generator=torch.Generator().manual_seed(seed))  # as sample_image draws

    def run(system, degraded, refs, noise):
        z0 = sampling.restore_tokens(system, degraded, refs, noise, steps=12, guidance=4.0)
        return z0, jnp.clip(system.decode(z0, SIZE, SIZE), -1, 1)
    z0, image = nnx.jit(run)(system, degraded, refs, tokens(noise))
    assert rel_err(z0, tokens(recorder.latents)) < 1e-5
    want = recorder.image.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(np.asarray(image) - want).max() / 2 < 1 / 255  # [-1, 1] -> [0, 1]


def test_autoencoder_matches_theirs(release):
    model = vae.load(str(release.root / "vae"))
    images = np.random.default_rng(5).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        latents = release.ae.encode(nchw(images))
        decoded = release.ae.decode(latents)
    got = jax.jit(lambda x: vae.encode_tokens(model, x))(images)
    assert rel_err(got, tokens(latents)) < 1e-5
    out = jax.jit(lambda t: vae.decode_tokens(model, t, SIZE, SIZE))(got)
    assert rel_err(out, decoded.permute(0, 2, 3, 1).numpy()) < 1e-5


def test_lora_init_starts_training_full(release):
    """`full` starts from the authors' adapter: their factors in our layers, trainable."""
    full = face_system.build(paper_config(release, "full"))
    layer = full.model.backbone.transformer_blocks[0].attn
    qkv = release.transformer.double_blocks[0].img_attn.qkv
    np.testing.assert_array_equal(layer.to_k.lora_a[...], qkv.lora_A.detach().numpy().T)
    np.testing.assert_array_equal(layer.to_k.lora_b[...], qkv.lora_B.detach().numpy()[64:128].T)  # k: 2nd third
    assert layer.to_k.lora_scale == ALPHA / RANK
    trained = weights.named_params(full, face_system.trainable_filter(paper_config(release, "full")))
    assert "model.backbone.transformer_blocks.0.attn.to_k.lora_b" in trained
    assert len([k for k in trained if ".lora_" in k]) == 2 * (3 + 1 + 2 * 2)  # q, k, v, out; 2 x (fused in, out)


def test_restore_cli_from_config(release, tmp_path, capsys):
    """`restore --checkpoint CONFIG.py --lora-init DIR`: the released model without a training workdir."""
    cfg = paper_config(release)
    cfg.model.lora_init = ""
    config = write_config(cfg, tmp_path / "release.py")
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / "deg.png")
    args = ["--checkpoint", str(config), "--input", str(tmp_path / "deg.png"), "--output", str(tmp_path / "out.png")]
    assert restore.main(args) == 1
    assert "--lora-init" in capsys.readouterr().err
    loaded, _, step = workdir.load(str(config), lora_init=str(release.root / "lora"))
    proj = release.transformer.single_blocks[1].linear2
    assert step == 0
    np.testing.assert_array_equal(loaded.model.backbone.single_transformer_blocks[1].attn.to_out.lora_b[...],
                                  proj.lora_B.detach().numpy().T)
    # --config.* overrides, as train takes them, apply to a config checkpoint; a field it lacks is one line.
    _, cfg, _ = workdir.load(str(config), lora_init=str(release.root / "lora"),
                             overrides=["--config.model.precision=bf16", "--config.seed=7"])
    assert (cfg.model.precision, cfg.seed) == ("bf16", 7)
    capsys.readouterr()
    assert restore.main(args + ["--lora-init", str(release.root / "lora"), "--config.model.lora.rnak=4"]) == 1
    assert "rnak" in capsys.readouterr().err


# --- the importer's refusals: each bad file names itself and the culprit, and nothing is written ---


def _their_files(ref, root, preset="flux2_klein", config=True, edit=None):
    """A tiny LoRA in their format (as their save writes it), edited by `edit(state, metadata)`."""
    torch.manual_seed(3)
    model = their_tiny_flux2(ref)
    ref.lora.inject_lora(model, preset, rank=RANK, alpha=ALPHA)
    state = ref.lora.get_lora_state_dict(model)
    metadata = {"lora_target_preset": preset, "lora_rank": RANK, "lora_alpha": ALPHA}
    if edit:
        edit(state, metadata)
    os.makedirs(root)
    save_file({k: v.contiguous() for k, v in state.items()}, root / "lora_weights.safetensors")
    if config:
        (root / "adapter_config.json").write_text(json.dumps(metadata))
    return root / "lora_weights.safetensors"


BAD = {
    "stray tensor": (lambda s, m: s.update({"double_blocks.0.img_attn.qkv.bias": torch.zeros(3)}),
                     ["'double_blocks.0.img_attn.qkv.bias'", "unexpected tensor"]),
    "unknown module": (lambda s, m: s.update({"double_blocks.0.img_mod.lin.lora_A.weight": torch.zeros(RANK, 64),
                                              "double_blocks.0.img_mod.lin.lora_B.weight": torch.zeros(384, RANK)}),
                       ["'double_blocks.0.img_mod.lin'", "unknown module"]),
    "outside the preset": (lambda s, m: s.update({"double_blocks.0.txt_attn.proj.lora_A.weight": torch.zeros(RANK, 64),
                                                  "double_blocks.0.txt_attn.proj.lora_B.weight": torch.zeros(64, RANK),
                                                  "double_blocks.0.txt_attn.proj.alpha": torch.tensor(ALPHA)}),
                           ["'transformer_blocks.0.attn.to_add_out'", "unknown module"]),
    "missing module": (lambda s, m: [s.pop(f"single_blocks.1.linear2{x}") for x in (".lora_A.weight", ".lora_B.weight",
                                                                                    ".alpha")],
                       ["'single_transformer_blocks.1.attn.to_out'", "missing module"]),
    "missing pair": (lambda s, m: s.pop("single_blocks.0.linear1.lora_B.weight"),
                     ["'single_blocks.0.linear1.lora_B.weight'", "missing A/B pair"]),
    "shape": (lambda s, m: s.update({"double_blocks.0.img_attn.proj.lora_B.weight": torch.zeros(60, RANK)}),
              ["'double_blocks.0.img_attn.proj.lora_B.weight'", "(60, 4)", "(64, 4)"]),
    "rank": (lambda s, m: m.update(lora_rank=8), ["lora_rank 8", "rank 4", "rank disagreement"]),
    "alpha": (lambda s, m: s.update({"single_blocks.0.linear2.alpha": torch.tensor(2.0)}),
              ["[2.0, 8.0]", "alpha disagreement"]),
    "preset": (lambda s, m: m.update(lora_target_preset="attn"), ["'attn'", "unknown lora_target_preset"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_importer_refuses(ref, tmp_path, capsys, case):
    edit, needles = BAD[case]
    src = _their_files(ref, tmp_path / "authors", edit=edit)
    dst = tmp_path / "out"
    assert convert_lora.main(["--src", str(src), "--dst", str(dst)]) == 1
    err = capsys.readouterr().err
    for needle in [str(src), *needles]:
        assert needle in err, err
    assert sorted(os.listdir(tmp_path)) == ["authors"]  # nothing written, not even a partial directory


def test_importer_reads_presets_from_the_tensors(ref, tmp_path, capsys):
    """Without adapter_config.json the preset is the one the modules cover and alpha the tensors'."""
    src = _their_files(ref, tmp_path / "authors", preset="flux2_klein_full", config=False)
    assert convert_lora.main(["--src", str(src.parent), "--dst", str(tmp_path / "out")]) == 0
    stored = weights.read_config(str(tmp_path / "out"), lora.FAMILY)
    assert stored == {"rank": RANK, "alpha": ALPHA, "targets": "flux2_klein_full"}


def test_lora_init_must_fit_the_config(release):
    model = flux2.load(str(release.root / "transformer"))
    lora.add_lora(model, 2 * RANK, ALPHA, lora.preset_targets("flux2_klein"))
    with pytest.raises(weights.WeightsError, match="'rank': 4"):
        lora.restore(model, str(release.root / "lora"), 2 * RANK, ALPHA, "flux2_klein")


def test_preset_counts_on_klein_4b_match_theirs(ref):
    """Our adapters per preset on klein-base-4B, against their inject_lora on their Klein4BParams model: the same
    Linears, with A stored once per q, k and v where they share one over the fused qkv."""
    cfg = flux2.PRESETS["klein-base-4b"]
    for preset in ("flux2_klein", "flux2_klein_full"):
        with torch.device("meta"):
            theirs = ref.model.Flux2(ref.model.Klein4BParams())
            ref.lora.inject_lora(theirs, preset, rank=16, alpha=16.0)
        their_count = sum(p.numel() for p in ref.lora.lora_parameters(theirs))
        model = nnx.eval_shape(lambda: flux2.Flux2Transformer(cfg, rngs=nnx.Rngs(0)))
        lora.add_lora(model, 16, 16.0, lora.preset_targets(preset))
        fused = cfg.num_layers * (2 if preset == "flux2_klein" else 4)  # q, k, v beyond the first, per fused qkv
        assert lora.count(model) == their_count + fused * 16 * cfg.hidden_size, preset


# --- diffusers/peft-named LoRAs: our own export, diffusers' trainers and peft read back ---

TINY = flux2.Flux2Config(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
                         num_attention_heads=2, joint_attention_dim=32, mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2))


def tiny_adapted(preset: str, rank: int, alpha: float, seed: int = 0) -> flux2.Flux2Transformer:
    """A tiny FLUX.2 transformer with `preset` adapters, B random (it starts at zero) so that updates show."""
    model = flux2.Flux2Transformer(TINY, rngs=nnx.Rngs(seed))
    lora.add_lora(model, rank, alpha, lora.preset_targets(preset), seed=seed)
    rng = np.random.default_rng(seed)
    for layer in lora.linears(model).values():
        if layer.lora_b is not None:
            layer.lora_b.set_value(rng.standard_normal(layer.lora_b.get_value().shape).astype(np.float32) * 0.1)
    return model


def updates(model: flux2.Flux2Transformer) -> dict[str, np.ndarray]:
    """Each adapted Linear's weight update A B * alpha / rank, (in, out) in float64."""
    return {name: np.asarray(layer.lora_a[...], np.float64) @ np.asarray(layer.lora_b[...], np.float64)
            * layer.lora_scale for name, layer in lora.linears(model).items() if layer.lora_a is not None}


def assert_reads_back(model, dst, preset: str, rank: int, alpha: float):
    """The converted directory `dst` holds `preset` at (rank, alpha) and gives `model`'s updates on a fresh model."""
    assert weights.read_config(str(dst), lora.FAMILY) == {"rank": rank, "alpha": alpha, "targets": preset}
    back = flux2.Flux2Transformer(TINY, rngs=nnx.Rngs(1))
    lora.add_lora(back, rank, alpha, lora.preset_targets(preset), seed=1)
    lora.restore(back, str(dst), rank, alpha, preset)
    want, got = updates(model), updates(back)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("preset", sorted(lora.PRESETS))
def test_export_round_trips_through_the_importer(tmp_path, capsys, preset):
    """convert.export's LoRA file (diffusers names, alpha / rank folded into B, alpha = rank) converts back to
    the exported model's updates, from the export directory as from the file."""
    model = tiny_adapted(preset, RANK, ALPHA)
    tensors, config = export.lora_state(model)
    (tmp_path / "export").mkdir()
    write_safetensors(str(tmp_path / "export" / export.LORA_FILE), tensors, export.lora_metadata(config))
    assert convert_lora.main(["--src", str(tmp_path / "export"), "--dst", str(tmp_path / "lora")]) == 0
    assert "(diffusers names)" in capsys.readouterr().err
    assert_reads_back(model, tmp_path / "lora", preset, RANK, float(RANK))


PEFT_FILES = {  # key prefix, where rank and alpha are given
    "diffusers trainer": ("transformer.", "metadata"),
    "peft save_pretrained": ("base_model.model.", "adapter_config.json"),
    "bare, no alpha": ("", None),
}


@pytest.mark.parametrize("case", sorted(PEFT_FILES))
def test_importer_reads_diffusers_and_peft_files(tmp_path, case):
    """Unfolded factors with their alpha in diffusers' metadata or peft's adapter_config.json; with neither, alpha
    is the rank, as diffusers' loader takes it."""
    prefix, given = PEFT_FILES[case]
    model = tiny_adapted("flux2_klein_full", RANK, ALPHA if given else float(RANK))
    tensors = {}
    for name, layer in lora.linears(model).items():
        if layer.lora_a is not None:
            tensors[f"{prefix}{name}.lora_A.weight"] = np.asarray(layer.lora_a[...]).T
            tensors[f"{prefix}{name}.lora_B.weight"] = np.asarray(layer.lora_b[...]).T
    peft_config = {"r": RANK, "lora_alpha": ALPHA, "rank_pattern": {}, "alpha_pattern": {}, "peft_type": "LORA"}
    metadata = export.lora_metadata(peft_config) if given == "metadata" else {"format": "pt"}
    (tmp_path / "src").mkdir()
    write_safetensors(str(tmp_path / "src" / "adapter_model.safetensors"), tensors, metadata)
    if given == "adapter_config.json":
        (tmp_path / "src" / "adapter_config.json").write_text(json.dumps(peft_config))
    assert convert_lora.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "lora")]) == 0
    assert_reads_back(model, tmp_path / "lora", "flux2_klein_full", RANK, ALPHA if given else float(RANK))


PEFT_BAD = {
    "another naming": (lambda t, m: {f"model.diffusion_model.{k}": v for k, v in t.items()},
                       ["'model.diffusion_model.", "transformer.transformer_blocks.N.attn.to_q.lora_A.weight",
                        "double_blocks.N.img_attn.qkv.lora_A.weight"]),
    "mixed namings": (lambda t, m: {**t, "double_blocks.0.img_attn.qkv.lora_A.weight": np.zeros((RANK, 16), np.float32),
                                    "double_blocks.0.img_attn.qkv.lora_B.weight": np.zeros((48, RANK), np.float32)},
                      ["'transformer.single_transformer_blocks.0.attn.to_out'",
                       "the naming of 'double_blocks.0.img_attn.qkv'"]),
    "rank pattern": (lambda t, m: m.update(rank_pattern={"to_q": 8}) and t, ["rank_pattern", "one of each"]),
    "rank": (lambda t, m: m.update(r=8) and t, ["lora_rank 8", "rank 4", "rank disagreement"]),
}


@pytest.mark.parametrize("case", sorted(PEFT_BAD))
def test_importer_refuses_diffusers_files(tmp_path, capsys, case):
    edit, needles = PEFT_BAD[case]
    tensors, config = export.lora_state(tiny_adapted("flux2_klein", RANK, ALPHA))
    tensors = edit(tensors, config) or tensors
    src = tmp_path / "src.safetensors"
    write_safetensors(str(src), tensors, export.lora_metadata(config))
    assert convert_lora.main(["--src", str(src), "--dst", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    for needle in [str(src), *needles]:
        assert needle in err, err
    assert not (tmp_path / "out").exists()
