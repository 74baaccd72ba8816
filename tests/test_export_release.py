"""`convert.export --release`: our LoRA in the IConFace authors' release format, run by their own code.

The other direction of tests/test_lora_release.py, on its tiny release (their transformer, VAE and text encoder
stand-in, from its fixtures): our concat model's adapters, trained apart (q, k and v with their own A), exported
and loaded by their `temporary_lora`, give through their `sample_image` our restoration from the same noise.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from helpers import rel_err, their_tiny_flux2, write_config
from convert import export
from iconface_jax import sampling
from iconface_jax import face_system
from iconface_jax.models import lora
from test_lora_release import (GRID, PROMPT, SIZE, Recorder, nchw, paper_config, ref, release,  # noqa: F401 (ref, release: fixtures)
                               their_text_encoder, tokens)


def trained(release, apart: bool, seed: int = 0):
    """The concat model from the release's LoRA, with `apart` every adapter factor then moved by its own noise (as
    training does: the q, k and v adapters that share A on import no longer do)."""
    system = face_system.build(paper_config(release))
    if not apart:
        return system
    rng = np.random.default_rng(seed)
    for layer in lora.linears(system.model.backbone).values():
        if layer.lora_a is not None:
            for factor in (layer.lora_a, layer.lora_b):
                value = np.asarray(factor.get_value())
                factor.set_value((value + 0.05 * rng.standard_normal(value.shape)).astype(np.float32))
    return system


@pytest.mark.parametrize("apart", [False, True])
def test_release_export_runs_in_their_sample_image(ref, release, tmp_path, apart):
    system = trained(release, apart)
    cfg = paper_config(release)
    written = export.export_release(system, cfg, str(tmp_path / "export"))
    assert sorted(p.rsplit("/", 1)[1] for p in written) == [export.RELEASE_CONFIG, export.RELEASE_FILE]
    config = json.loads((tmp_path / "export" / export.RELEASE_CONFIG).read_text())
    rank = 12 if apart else 4  # apart: q, k and v each with a rank-4 third
    assert config == {"lora_target_preset": "flux2_klein", "lora_rank": rank, "lora_alpha": float(rank)}

    rng = np.random.default_rng(3)
    degraded = rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    refs = rng.uniform(-1, 1, (1, 2, SIZE, SIZE, 3)).astype(np.float32)
    recorder, seed = Recorder(release.ae), 11
    transformer = their_tiny_flux2(ref).eval()  # the release's base, without its adapters
    transformer.load_state_dict(load_file(release.root / "flux-2-tiny.safetensors"))
    with ref.lora.temporary_lora(transformer, tmp_path / "export"):
        ref.inference.sample_image(transformer, recorder, their_text_encoder, {"guidance_distilled": False},
                                   PROMPT, SIZE, 12, 4.0, seed, torch.device("cpu"), torch.float32, "no",
                                   condition_image=nchw(degraded)[0], reference_image=nchw(refs[0]))
    noise = torch.randn((1, 128, GRID, GRID), generator=torch.Generator().manual_seed(seed))  # as sample_image draws
    z0 = nnx.jit(lambda s, d, r, n: sampling.restore_tokens(s, d, r, n, steps=12, guidance=4.0))(
        system, degraded, refs, tokens(noise))
    assert rel_err(z0, tokens(recorder.latents)) < 1e-5


def test_release_export_of_an_imported_lora_keeps_its_rank(release, tmp_path):
    """Adapters that still share A over q, k and v export at their own rank, the update unchanged."""
    system = face_system.build(paper_config(release))
    tensors, rank = export.release_state(system.model.backbone)
    assert rank == 4
    qkv = release.transformer.double_blocks[0].img_attn.qkv  # their injected module (base layer + factors)
    want = (qkv.lora_B @ qkv.lora_A).detach().numpy() * qkv.scaling
    got = tensors["double_blocks.0.img_attn.qkv.lora_B.weight"] @ tensors["double_blocks.0.img_attn.qkv.lora_A.weight"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("field, value, needle", [("model.iconface.variant", "full", "concat variant"),
                                                  ("model.train_base", True, "base transformer"),
                                                  ("model.lora.targets", "attention", "no release preset")])
def test_release_export_refuses_what_their_code_cannot_run(release, tmp_path, field, value, needle):
    cfg = paper_config(release)
    section, key = field.rsplit(".", 1)
    cfg[section][key] = value
    with pytest.raises(ValueError, match=needle):
        export.check_release(cfg)


def test_release_cli(ref, release, tmp_path, capsys):
    """`--release` from the command line writes what their loader reads back as the fixture's updates; a variant
    their code cannot run is refused in one line naming the reason, and nothing is written."""
    checkpoint = write_config(paper_config(release), tmp_path / "concat.py")
    assert export.main(["--checkpoint", checkpoint, "--out", str(tmp_path / "out"), "--release"]) == 0
    state, metadata = ref.lora.load_lora_checkpoint(tmp_path / "out")
    scaling = metadata["lora_alpha"] / metadata["lora_rank"]
    for name, module in ref.lora.iter_lora_modules(release.transformer):
        got = state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"] * scaling
        np.testing.assert_allclose(got.numpy(), module.lora_delta().detach().numpy(), rtol=1e-5, atol=1e-7)
        assert state[f"{name}.alpha"].shape == () and state[f"{name}.alpha"] == metadata["lora_rank"]  # 0-d, as theirs

    capsys.readouterr()
    checkpoint = write_config(paper_config(release, "full"), tmp_path / "full.py")
    assert export.main(["--checkpoint", checkpoint, "--out", str(tmp_path / "full"), "--release"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "concat variant" in err, err
    assert not (tmp_path / "full").exists()
