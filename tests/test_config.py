"""The config module: defaults + deltas give the configs as they were, one loader, validation, upgrading."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import ml_collections
import pytest

from helpers import ROOT, demo_config, env_with, toy_flags
from iconface_jax import config

pytestmark = pytest.mark.subprocess

VARIANTS = ("concat", "struct", "id", "one_route", "full")

# configs/demo.py as `git show 2309a38:configs/demo.py` built it (before iconface_jax/config.py), every field
# but the degradation presets' parameters (DEGRADATION_PARAMS_SHA256), with its type.
DEMO_BEFORE = {
    'data.degradation.preset_probs': (0.5, 0.5), 'data.degradation.presets': ('moderate', 'severe'),
    'data.device_prefetch': 2, 'data.ffhq_ref.csv': '', 'data.ffhq_ref.image_dir': '', 'data.ffhq_ref.lq_dir': '',
    'data.ffhq_ref.ref_dir': '', 'data.ffhq_ref.split_file': '', 'data.ffhq_ref.val_csv': '',
    'data.ffhq_ref.val_split_file': '', 'data.folder.root': '', 'data.latents': '', 'data.min_side_fraction': 0.25,
    'data.num_epochs': 0, 'data.num_threads': 1, 'data.num_workers': 0, 'data.prefetch_batches': 2,
    'data.ref_count_probs': (0.3, 0.3, 0.2, 0.2), 'data.resolution': 64, 'data.seed': 42, 'data.shuffle': True,
    'data.source': 'synthetic', 'data.synthetic.aligned': True, 'data.synthetic.first_identity': 0,
    'data.synthetic.images_per_identity': 6, 'data.synthetic.num_identities': 200, 'data.synthetic.seed': 0,
    'data.tfds.data_dir': '', 'data.tfds.identity_key': 'identity', 'data.tfds.image_key': 'image',
    'data.tfds.name': '', 'data.tfds.split': 'train', 'data.use_given_lq': False,
    'log.checkpoint_every': 400, 'log.every': 25, 'log.guidance': 4.0, 'log.keep': 2, 'log.sample_count': 4,
    'log.sample_every': 800, 'log.sample_steps': 12,
    'mesh.data': -1, 'mesh.fsdp': 1, 'mesh.shard_min_size': 4194304,
    'model.attention': '', 'model.autoencoder.bands': (6, 3), 'model.autoencoder.factor': 8,
    'model.autoencoder.kind': 'patchify', 'model.autoencoder.remat_decoder': False, 'model.autoencoder.weights': '',
    'model.backbone.attention_head_dim': 32, 'model.backbone.axes_dims_rope': (8, 8, 8, 8),
    'model.backbone.in_channels': 33, 'model.backbone.joint_attention_dim': 32, 'model.backbone.mlp_ratio': 2.0,
    'model.backbone.num_attention_heads': 6, 'model.backbone.num_layers': 1, 'model.backbone.num_single_layers': 2,
    'model.backbone.preset': 'tiny', 'model.face_encoder.channels': (8, 8, 16, 16),
    'model.face_encoder.units': (1, 1, 1, 1), 'model.face_encoder.weights': '', 'model.iconface.memory_dim': 32,
    'model.iconface.memory_readers': 'image', 'model.iconface.memory_tokens': 16, 'model.iconface.pool_heads': 2,
    'model.iconface.prediction': 'clean', 'model.iconface.reference_cache': False,
    'model.iconface.residual_rank': 192, 'model.iconface.variant': 'full', 'model.iconface.xattn_heads': 2,
    'model.iconface.xattn_rank': 16, 'model.init': 'torch', 'model.lora.alpha': 8.0, 'model.lora.rank': 8,
    'model.lora.targets': 'flux2_klein_full', 'model.precision': 'float32', 'model.remat': 'none',
    'model.text.embeddings': '', 'model.text.length': 8, 'model.train_base': True, 'model.weights': '',
    'seed': 42,
    'train.batch_size': 4, 'train.ema_decay': 0.0, 'train.grad_clip': 1.0, 'train.lambda_h': 0.5,
    'train.lambda_id': 0.05, 'train.learning_rate': 0.002, 'train.max_nonfinite': 5, 'train.omega_min': 0.25,
    'train.residual_dropout': 0.75, 'train.sigma_law': 'logit_normal', 'train.sigma_mean': 1.0,
    'train.sigma_shift': 0.0, 'train.sigma_std': 1.0, 'train.sigma_unshifted_fraction': 0.0, 'train.steps': 1600,
    'train.stop_at': 0, 'train.term_grad_norms': False, 'train.text_dropout': 0.1, 'train.warmup_steps': 50,
    'train.weight_decay': 0.0, 'workdir': 'runs/demo'}
# configs/iconface_klein4b.py as 2309a38 built it: the demo's fields less those only the demo set, and these.
KLEIN_ONLY_DEMO = ('model.autoencoder.bands', 'model.init', *(k for k in DEMO_BEFORE if k.startswith(
    ('model.backbone.', 'model.iconface.')) and k not in ('model.backbone.preset', 'model.iconface.memory_readers',
                                                          'model.iconface.reference_cache', 'model.iconface.variant')))
KLEIN_BEFORE = {k: v for k, v in DEMO_BEFORE.items() if k not in KLEIN_ONLY_DEMO} | {
    'data.ffhq_ref.csv': 'data/FFHQ-Ref/reference_mapping/train_references.csv',
    'data.ffhq_ref.image_dir': 'data/FFHQ-Ref/images512',
    'data.ffhq_ref.split_file': 'data/FFHQ-Ref/id_based_ffhq_split/train.txt',
    'data.ffhq_ref.val_csv': 'data/FFHQ-Ref/reference_mapping/val_references.csv',
    'data.ffhq_ref.val_split_file': 'data/FFHQ-Ref/id_based_ffhq_split/val.txt', 'data.num_workers': 8,
    'data.resolution': 512, 'data.source': 'ffhq_ref', 'data.synthetic.num_identities': 1000,
    'log.checkpoint_every': 1000, 'log.every': 50, 'log.keep': 3, 'log.sample_every': 1000,
    'model.autoencoder.kind': 'vae', 'model.autoencoder.weights': 'weights/flux2-vae',
    'model.backbone.preset': 'klein-base-4b', 'model.face_encoder.channels': (64, 128, 256, 512),
    'model.face_encoder.units': (3, 4, 14, 3), 'model.face_encoder.weights': 'weights/adaface-ir50',
    'model.lora.alpha': 16.0, 'model.lora.rank': 16, 'model.lora.targets': 'flux2_klein', 'model.lora_init': '',
    'model.precision': 'bf16', 'model.text.embeddings': 'weights/restore_prompt.npz', 'model.text.length': 512,
    'model.train_base': False, 'model.weights': 'weights/klein-base-4b', 'train.batch_size': 16,
    'train.ema_decay': 0.999, 'train.lambda_id': 0.1, 'train.learning_rate': 0.0001, 'train.max_nonfinite': 10,
    'train.residual_dropout': 0.0, 'train.sigma_mean': 0.0, 'train.sigma_unshifted_fraction': 0.25,
    'train.steps': 30000, 'train.warmup_steps': 500, 'train.weight_decay': 0.01}
# sha256 of json.dumps({field: value} of data.degradation.params.*, sort_keys=True, default=list) at 2309a38.
DEGRADATION_PARAMS_SHA256 = "994e90a00e8374fa95736da9cd6ad434662488ce7e4f0c5951500006d4da3cd3"
# What the code read with `.get(field, default)` where a config lacked the field: now written in every config.
IMPLICIT_BEFORE = {"demo": {"model.lora_init": ""},
                   "iconface_klein4b": {"model.init": "torch", "model.autoencoder.bands": ()}}


def typed(flat: dict) -> dict:
    return {k: (type(v).__name__, v) for k, v in flat.items()}


@pytest.mark.parametrize("name", ["demo", "iconface_klein4b"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_config_is_what_it_was(name, variant):
    """Every field of every variant of both configs, with its type, as the configs built it before they became
    deltas over `config.defaults()`; new are only the former implicit defaults, `config_version` and
    `compile_cache`."""
    got = config.flat(config.load(f"{ROOT / 'configs' / name}.py:{variant}"))
    params = {k: got.pop(k) for k in list(got) if k.startswith("data.degradation.params.")}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=list).encode()).hexdigest()
    assert digest == DEGRADATION_PARAMS_SHA256
    before = dict(DEMO_BEFORE if name == "demo" else KLEIN_BEFORE, **{"model.iconface.variant": variant})
    before["workdir"] = {"demo": "runs/demo" if variant == "full" else f"runs/demo_{variant}",
                         "iconface_klein4b": f"runs/iconface_klein4b_{variant}"}[name]
    new_fields = {"config_version": 1, "compile_cache": before["workdir"] + "/compile_cache"}
    want = before | IMPLICIT_BEFORE[name] | new_fields
    assert typed(got) == typed(want)


def test_the_default_variant_is_full():
    assert config.load(str(ROOT / "configs" / "demo.py")).to_dict() == \
        config.load(f"{ROOT / 'configs' / 'demo.py'}:full").to_dict()


def test_overrides_are_parsed_as_the_command_line_parses_them():
    cfg = demo_config("--config.train.steps=7", "--config.model.autoencoder.bands=(4, 2)",
                      "--config.model.train_base=False", "--config.data.latents=some/dir", "--config.log.guidance=2")
    assert (cfg.train.steps, cfg.model.autoencoder.bands, cfg.model.train_base) == (7, (4, 2), False)
    assert (cfg.data.latents, cfg.log.guidance) == ("some/dir", 2.0) and isinstance(cfg.log.guidance, float)
    cfg.model.lora_init = "x"  # the loaded config is the caller's to change
    assert demo_config().model.lora_init == ""


@pytest.mark.parametrize("spec,overrides,message", [
    ("configs/demo.py", ["--config.train.stepz=3"],
     "flag --config.train.stepz=3: the config has no field 'stepz'; Did you mean \"steps\" instead of \"stepz\"?"),
    ("configs/demo.py", ["--config.train.steps=3", "--config.train.steps=4"],
     "flag --config.train.steps is given twice (--config.train.steps=3, --config.train.steps=4); give it once"),
    ("configs/demo.py", ["train.steps=3"], "override 'train.steps=3': expected --config.a.b=value"),
    ("configs/nope.py", [], "flag --config=configs/nope.py: config file configs/nope.py does not exist"),
    ("configs/demo.py:two_route", [], "flag --config=configs/demo.py:two_route: unknown variant 'two_route'; "
                                      "the variants are concat | struct | id | one_route | full"),
    ("iconface_jax/__init__.py", [], "flag --config=iconface_jax/__init__.py: config file iconface_jax/__init__.py "
                                     "has no get_config()"),
])
def test_load_refuses_in_one_line(monkeypatch, spec, overrides, message):
    monkeypatch.chdir(ROOT)
    with pytest.raises(config.ConfigError) as e:
        config.load(spec, overrides)
    assert str(e.value) == message


@pytest.mark.parametrize("override,message", [
    ("--config.train.steps=-5", "config.train.steps must lie in [1, inf), got -5"),
    ("--config.train.batch_size=0", "config.train.batch_size must lie in [1, inf), got 0"),
    ("--config.log.keep=0", "config.log.keep must lie in [1, inf), got 0"),
    ("--config.log.checkpoint_every=0", "config.log.checkpoint_every must lie in [1, inf), got 0"),
    ("--config.log.every=0", "config.log.every must lie in [1, inf), got 0"),
    ("--config.log.sample_every=0", "config.log.sample_every must lie in [1, inf), got 0"),
    ("--config.train.learning_rate=0.0", "config.train.learning_rate must lie in (0, inf), got 0.0"),
    ("--config.train.warmup_steps=-1", "config.train.warmup_steps must lie in [0, inf), got -1"),
    ("--config.train.ema_decay=1.0", "config.train.ema_decay must lie in [0, 1), got 1.0"),
    ("--config.train.residual_dropout=1.5", "config.train.residual_dropout must lie in [0, 1], got 1.5"),
    ("--config.train.sigma_std=nan", "config.train.sigma_std must lie in (0, inf), got nan"),
    ("--config.mesh.data=0", "config.mesh.data must be -1 (every device not in fsdp) or >= 1, got 0"),
    ("--config.data.ref_count_probs=(0.5,0.4,0.0,0.0)",
     "config.data.ref_count_probs must be probabilities in [0, 1] summing to 1, got (0.5, 0.4, 0.0, 0.0)"),
    ("--config.data.ref_count_probs=(1.5,-0.5)",
     "config.data.ref_count_probs must be probabilities in [0, 1] summing to 1, got (1.5, -0.5)"),
    ("--config.data.degradation.presets=(\"moderate\",)",
     "config.data.degradation.presets ('moderate',) and preset_probs (0.5, 0.5) differ in length"),
    ("--config.data.resolution=60", "config.data.resolution=60: the patchify codec tiles images in 8 px squares; "
                                    "use a multiple of 8"),
    ("--config.model.iconface.variant=two_route", "config.model.iconface: unknown IConFace variant 'two_route'"),
    ("--config.model.remat=some", "config.model.remat 'some' is not one of none | "),
    ("--config.model.lora.targets=ffn", "config.model.lora.targets 'ffn' is not one of "),
    ("--config.train.sigma_law=cosine", "config.train.sigma_law 'cosine' is not one of logit_normal | uniform | mode"),
    ("--config.data.source=ffhq", "config.data.source 'ffhq' is not one of ffhq_ref | folder | synthetic | tfds"),
    ("--config.model.precision=fp16", "config.model.precision: unknown precision 'fp16'"),
    ("--config.model.weights=/nonexistent/klein", "config.model.weights: /nonexistent/klein does not exist"),
    ("--config.workdir=", "config.workdir is empty"),
])
def test_validate_names_the_field_value_and_range(override, message):
    config.validate(demo_config())  # the demo as shipped is valid
    with pytest.raises(config.ConfigError) as e:
        config.validate(demo_config(override))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_validate_the_codec_tiling_of_the_vae_and_the_devices():
    klein = config.load(f"{ROOT / 'configs' / 'iconface_klein4b.py'}")
    klein.model.weights = klein.model.autoencoder.weights = klein.model.face_encoder.weights = ""
    klein.model.text.embeddings = ""
    config.validate(klein)
    klein.data.resolution = 520  # a multiple of the VAE's 8 px, not of its 2 x 2 latent patches
    with pytest.raises(config.ConfigError, match="the vae codec tiles images in 16 px squares"):
        config.validate(klein)
    cfg = demo_config("--config.train.batch_size=6")
    config.validate(cfg, device_count=2)
    with pytest.raises(config.ConfigError, match="batch_size=6 is not divisible by the 4 devices"):
        config.validate(cfg, device_count=4)
    with pytest.raises(config.ConfigError, match="data=3 fsdp=1 does not fit the 2 devices"):
        config.validate(demo_config("--config.mesh.data=3"), device_count=2)


def test_a_config_not_built_on_the_defaults_is_refused_by_field():
    cfg = demo_config()
    del cfg.model["init"]
    with pytest.raises(config.ConfigError, match=r"^config.model.init is missing"):
        config.validate(cfg)


@pytest.mark.parametrize("args,last_line", [
    (["--config.train.steps=-5"], "FATAL config error: config.train.steps must lie in [1, inf), got -5"),
    (["--config.log.checkpoint_every=0"],
     "FATAL config error: config.log.checkpoint_every must lie in [1, inf), got 0"),
    (["--config=configs/absent.py"],
     "FATAL Flags parsing error: flag --config=configs/absent.py: config file configs/absent.py does not exist"),
])
def test_the_trainer_refuses_in_one_line_and_writes_nothing(tmp_path, args, last_line):
    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "iconface_jax.train", f"--config.workdir={workdir}", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env_with())
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == last_line, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not workdir.exists()


def test_help_lists_the_config_fields():
    out = subprocess.run([sys.executable, "-m", "iconface_jax.train", "--config", "configs/demo.py:concat", "--help"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env_with())
    assert "--config.train.steps" in out.stdout and "= 1600" in out.stdout
    assert "--config.model.iconface.variant" in out.stdout and "'concat'" in out.stdout


def stored(cfg: ml_collections.ConfigDict) -> dict:
    """A config as a workdir's config.json holds it (what the trainer writes)."""
    return json.loads(cfg.to_json_best_effort(indent=1))


def test_upgrade_keeps_a_config_of_this_release():
    for spec in ("demo.py", "demo.py:concat", "iconface_klein4b.py:id"):
        cfg = config.load(f"{ROOT / 'configs' / spec}")
        assert typed(config.flat(config.upgrade(stored(cfg)))) == typed(config.flat(cfg))


def test_upgrade_reads_the_config_json_the_trainer_writes(toy_run):
    """The workdir of a toy run of this release: its config.json upgraded is the config it was started with."""
    written = json.loads((toy_run / "config.json").read_text())
    started = config.load(str(ROOT / "configs" / "demo.py"), [f"--config.workdir={toy_run}", *toy_flags(
        "--config.train.steps=6", "--config.log.checkpoint_every=100")])  # conftest.toy_run's command line
    assert written["config_version"] == config.CONFIG_VERSION
    assert typed(config.flat(config.upgrade(written))) == typed(config.flat(started))


def test_upgrade_fills_an_old_workdir_config_as_it_trained():
    """A config.json from before config_version: the fields it lacked meant what the code then read for them."""
    old = stored(demo_config())
    del old["config_version"], old["model"]["iconface"]["memory_readers"], old["data"]["synthetic"]["aligned"]
    del old["model"]["lora"]["targets"], old["model"]["autoencoder"]["bands"], old["model"]["init"]
    del old["model"]["lora_init"], old["train"]["residual_dropout"]
    cfg = config.upgrade(old)
    assert cfg.model.iconface.memory_readers == "scene"  # scene tokens read the memory before the field
    assert cfg.data.synthetic.aligned is False  # free-pose views
    assert cfg.model.lora.targets == "attention"  # `feed_forward` absent: attention maps only
    assert tuple(cfg.model.autoencoder.bands) == ()  # pixel tokens
    assert (cfg.model.init, cfg.model.lora_init, cfg.train.residual_dropout) == ("torch", "", 0.0)
    assert cfg.config_version == 1
    config.validate(cfg)
    old["model"]["lora"]["feed_forward"] = True
    assert "feed_forward" not in config.upgrade(old).model.lora
    assert config.upgrade(old).model.lora.targets == "flux2_klein_full"
    with pytest.raises(config.ConfigError, match="config_version 2 is newer than this release's"):
        config.upgrade(dict(stored(demo_config()), config_version=2))
