"""Training configs: every field's default, loading `FILE.py[:ARG]` with overrides, validation, upgrading.

    cfg = config.load("configs/demo.py:concat", ["--config.train.steps=100"])
    config.validate(cfg)                       # every field's range, before anything is written or compiled
    cfg = config.upgrade(json.loads(text))     # a workdir's config.json, from any release

A config file's `get_config([variant])` starts from `defaults(variant)` and sets what makes it the demo
(configs/demo.py) or the paper's setup (configs/iconface_klein4b.py). The defaults are the paper's training recipe
on random weights with the experimental levers off; why each value is what it is: docs/decisions.md. The `data`
section's fields are documented in `iconface_jax.data.pipeline.default_config`. `model.backbone` and
`model.iconface` hold only what differs from the preset (`flux2.PRESETS`) and from `IConFaceConfig`.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from iconface_jax import flow, storage
from iconface_jax.data import latents, pipeline
from iconface_jax.models import flux2, iconface, lora, vae
from iconface_jax.models.layers import REMAT_POLICIES, Precision

# Written into every config; `upgrade` brings stored configs of earlier versions (none: 0) to it.
CONFIG_VERSION = 1

# Allowed ranges of the numeric fields, as intervals ("[a, b)": a <= v < b; inf: unbounded).
RANGES = {
    "seed": "[0, inf)",
    "model.lora.rank": "[1, inf)", "model.lora.alpha": "(0, inf)",
    "model.autoencoder.factor": "[1, inf)", "model.text.length": "[1, inf)",
    "data.resolution": "[1, inf)", "data.min_side_fraction": "[0, 1]", "data.num_epochs": "[0, inf)",
    "data.num_workers": "[0, inf)", "data.num_threads": "[1, inf)", "data.prefetch_batches": "[1, inf)",
    "data.device_prefetch": "[0, inf)", "data.synthetic.num_identities": "[1, inf)",
    "data.synthetic.images_per_identity": "[1, inf)", "data.synthetic.first_identity": "[0, inf)",
    "train.batch_size": "[1, inf)", "train.steps": "[1, inf)", "train.learning_rate": "(0, inf)",
    "train.warmup_steps": "[0, inf)", "train.weight_decay": "[0, inf)", "train.grad_clip": "(0, inf)",
    "train.ema_decay": "[0, 1)", "train.residual_dropout": "[0, 1]", "train.text_dropout": "[0, 1]",
    "train.lambda_id": "[0, inf)", "train.lambda_h": "[0, inf)", "train.omega_min": "[0, 1]",
    "train.sigma_std": "(0, inf)", "train.sigma_shift": "[0, inf)", "train.sigma_unshifted_fraction": "[0, 1]",
    "train.max_nonfinite": "[1, inf)", "train.stop_at": "[0, inf)",
    "mesh.fsdp": "[1, inf)", "mesh.shard_min_size": "[0, inf)",
    "log.every": "[1, inf)", "log.checkpoint_every": "[1, inf)", "log.keep": "[1, inf)",
    "log.sample_every": "[1, inf)", "log.sample_count": "[1, inf)", "log.sample_steps": "[1, inf)",
    "log.guidance": "[0, inf)",
}
# Fields holding a probability each, which sum to 1.
DISTRIBUTIONS = ("data.ref_count_probs", "data.degradation.preset_probs")
_HELP = ("--help", "--helpshort", "--helpfull", "-h", "-?")


class ConfigError(ValueError):
    """A config that cannot run, in one line naming the field (or file), the value and what is allowed."""


def defaults(variant: str = "full") -> ml_collections.ConfigDict:
    """Every field of a training config with its default; `variant` is a Table 3 row (`iconface.VARIANTS`)."""
    if variant not in iconface.VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; the variants are {' | '.join(iconface.VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.config_version = CONFIG_VERSION
    c.workdir = ""  # local or gs://: config.json, checkpoints/, metrics.jsonl, sample grids
    # Persistent compilation cache, local or gs://, "" or "none": off. In the workdir (it follows a --config.workdir
    # override), so that a restart of the run, on every host of a pod, reads the programs compiled before.
    c.compile_cache = c.get_ref("workdir") + "/compile_cache"
    c.seed = 42

    c.model = ml_collections.ConfigDict()
    c.model.weights = ""  # converted FLUX.2 weights (python -m convert.flux2); empty: random init of `backbone`
    c.model.backbone = ml_collections.ConfigDict(dict(preset="klein-base-4b"))  # + Flux2Config fields to change
    # Random init of the backbone: "torch" (torch.nn.Linear's) or "adaln_zero" (DiT's, for training from scratch);
    # docs/decisions.md#model-initialisation.
    c.model.init = "torch"
    c.model.precision = "bf16"  # bf16 | float32
    c.model.attention = ""  # backend; empty: the platform default (cudnn on GPU, splash on TPU)
    # Transformer blocks rematerialised in the backward pass: none | full (keep only block inputs) | save_dots
    # (and matmul outputs); with `autoencoder.remat_decoder` the identity loss's VAE decoder too
    # (docs/decisions.md#remat-policy).
    c.model.remat = "none"
    # LoRA targets, a preset of iconface_jax.models.lora: flux2_klein (the authors': image-side double-block
    # attention and the single blocks), flux2_klein_full (every block Linear) or attention (every attention map);
    # docs/decisions.md#lora-targets.
    c.model.lora = ml_collections.ConfigDict(dict(rank=16, alpha=16.0, targets="flux2_klein"))
    # A converted adapter to start from instead of B = 0 (python -m convert.lora; the authors' release is the
    # concat row).
    c.model.lora_init = ""
    c.model.train_base = False  # True: train every model parameter (from scratch), not only LoRA and pathways
    # + IConFaceConfig fields to change. reference_cache: degraded and reference tokens attend only among
    # themselves at sigma 0, so sampling computes their keys and values once per image; a different model: train
    # with it (docs/decisions.md#reference-cache). memory_readers: the tokens that read the degraded memory,
    # "image" (the paper: scene, degraded and reference tokens) or "scene"; recorded so that a workdir's
    # config.json says which model it trained (docs/decisions.md#memory-readers).
    c.model.iconface = ml_collections.ConfigDict(dict(variant=variant, reference_cache=False,
                                                      memory_readers="image"))
    # kind: vae (FLUX.2's) | patchify (the demo's fixed codec, `factor` px patches). bands=(luma, chroma): the
    # patchify codec keeps only each patch's low DCT frequencies (u + v below them); () keeps every pixel value
    # (docs/decisions.md#demo-codec). weights: converted VAE weights (python -m convert.vae); empty: random.
    c.model.autoencoder = ml_collections.ConfigDict(dict(kind="vae", factor=8, bands=(), weights="",
                                                         remat_decoder=False))
    # The frozen AdaFace (python -m convert.recognition); its shape is used without weights.
    c.model.face_encoder = ml_collections.ConfigDict(dict(weights="", units=(3, 4, 14, 3),
                                                          channels=(64, 128, 256, 512)))
    # Prompt embeddings (python -m convert.text_embeddings); empty: random ones of `length` tokens.
    c.model.text = ml_collections.ConfigDict(dict(embeddings="", length=512))

    c.data = pipeline.default_config()

    # AdamW with linear warmup and cosine decay, global-norm clipping (docs/decisions.md#optimiser-and-schedule);
    # EMA of the trained weights when ema_decay > 0.
    # Training sigma: `sigma_law` (logit_normal | uniform | mode) with sigma_mean / sigma_std, time-shifted by
    # `sigma_shift` (0: the sampler's dynamic shift exp(mu) at this resolution; 1: none, the authors' default);
    # a `sigma_unshifted_fraction` of the samples keeps the unshifted value (docs/decisions.md#training-sigma-law).
    # residual_dropout: the share of samples trained without the structure residual
    # (docs/decisions.md#residual-dropout). lambda_id, lambda_h, omega_min: the identity loss's weights
    # (docs/decisions.md#identity-loss-weights). text_dropout: the share trained on the empty prompt (the CFG
    # branch). term_grad_norms: log the gradient norms of L_fm and lambda_id L_id apart (one more backward pass
    # on steps with the identity loss). max_nonfinite: non-finite steps in a row that stop the run. stop_at:
    # leave (with a checkpoint) after this step, for staged runs; 0: run to `steps`.
    c.train = ml_collections.ConfigDict(dict(
        batch_size=16, steps=30000, learning_rate=1e-4, warmup_steps=500, weight_decay=0.01, grad_clip=1.0,
        ema_decay=0.999, residual_dropout=0.0, lambda_id=0.1, lambda_h=0.5, omega_min=0.25, text_dropout=0.1,
        sigma_law="logit_normal", sigma_mean=0.0, sigma_std=1.0, sigma_shift=0.0,
        sigma_unshifted_fraction=0.0, term_grad_norms=False, max_nonfinite=10, stop_at=0))
    # data=-1: every device not in fsdp. shard_min_size: frozen weights of fewer elements stay replicated when
    # fsdp > 1 (2**22: klein-4B's three smallest matrices, 3 MiB, which libtpu otherwise gathered inside a VAE
    # convolution; docs/performance.md#compile-time-and-host-memory).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, shard_min_size=2**22))
    # Steps between log rows, checkpoints (the last `keep` kept) and sample grids (`sample_count` faces restored
    # in `sample_steps` steps at `guidance`).
    c.log = ml_collections.ConfigDict(dict(every=50, checkpoint_every=1000, keep=3, sample_every=1000,
                                           sample_count=4, sample_steps=12, guidance=4.0))
    return c


def flat(cfg: ml_collections.ConfigDict | dict, prefix: str = "") -> dict:
    """The leaves of a config as {"a.b.c": value}."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def from_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config([ARG])` of the config file named as `FILE.py[:ARG]`, without overrides."""
    path, colon, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location("iconface_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path} has no get_config()")
    cfg = module.get_config(arg) if colon else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: get_config() returned a {type(cfg).__name__}, not a ConfigDict")
    return cfg


class _SpecParser(flags.ArgumentParser):
    """The config flag's value `FILE.py[:ARG]` read by `from_file` (ml_collections' own reader defers a
    missing file's error to the first use of the config)."""

    def parse(self, argument: str) -> ml_collections.ConfigDict:
        cfg = from_file(argument)
        cfg.lock()  # an override of a field the config lacks is refused, not added
        return cfg

    def flag_type(self) -> str:
        return "config FILE.py[:ARG]"


def define_flag(name: str = "config", flag_values: flags.FlagValues = flags.FLAGS,
                sys_argv: list[str] | None = None) -> flags.FlagHolder:
    """`--NAME FILE.py[:ARG]` with `--NAME.a.b=value` overrides (ml_collections' config flag), read by
    `from_file`; `sys_argv`: the command line the overrides are taken from (default: sys.argv)."""
    holder = config_flags.DEFINE_config_file(
        name, None, "training config FILE.py[:ARG]; set a field with --config.a.b=value (--help lists them)",
        flag_values=flag_values, lock_config=True, sys_argv=sys_argv)
    flag_values[name].parser = _SpecParser()
    return holder


def load(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """The config of `FILE.py[:ARG]` with `--config.a.b=value` overrides applied as the trainer's command line
    applies them (ml_collections' parsers; a field the config lacks or given twice refused)."""
    for override in overrides:
        if not override.startswith("--config."):
            raise ConfigError(f"override {override!r}: expected --config.a.b=value")
    argv = ["load", f"--config={spec}", *overrides]
    values = flags.FlagValues()
    define_flag("config", values, sys_argv=argv)
    _parse(values, argv, "config")
    cfg = values.config
    cfg.unlock()
    return cfg


def _parse(values: flags.FlagValues, argv: list[str], name: str) -> list[str]:
    """absl's parsing of `argv` into `values`, every failure raised as a one-line ConfigError."""
    seen = {}
    for arg in argv[1:]:
        if arg.startswith(f"--{name}."):
            key = arg.split("=", 1)[0]
            if key in seen:  # config_flags appends a repeated tuple override to the first instead of replacing it
                raise ConfigError(f"flag {key} is given twice ({seen[key]}, {arg}); give it once")
            seen[key] = arg
    try:
        return values(argv)
    except flags.Error as e:
        raise ConfigError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    except (KeyError, AttributeError) as e:  # ml_collections: "'stepz'\nDid you mean "steps" instead of "stepz"?"
        message = e.args[0]
        while isinstance(message, BaseException):  # ml_collections re-raises its KeyError as an AttributeError
            message = message.args[0]
        field, *hint = str(message).splitlines()
        flag = next((a for a in argv if a.startswith(f"--{name}.") and field.strip("'") in a.split("=")[0].split(".")),
                    f"--{name}")
        raise ConfigError(f"flag {flag}: the config has no field {field}{'; ' + ' '.join(hint) if hint else ''}") \
            from None


def parse_flags(argv: list[str], default: str | None = None, name: str = "config") -> list[str]:
    """absl's flag parsing (`app.run`'s flags_parser) for a program with a `define_flag` config: any bad flag,
    config file, variant or override exits with one line; `--help` also prints the config's fields with their
    values; without `--NAME`, `default` (None: the flag is required)."""
    given = any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv[1:])
    if not given and default is not None:
        argv = [argv[0], f"--{name}={default}", *argv[1:]]
    try:
        if any(a in _HELP for a in argv[1:]):
            spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")),
                        next((b for a, b in zip(argv, argv[1:]) if a == f"--{name}"), None))
            if spec:
                print(fields_help(from_file(spec), name))
        elif not given and default is None:
            raise ConfigError(f"--{name} FILE.py[:ARG] is required")
        return _parse(flags.FLAGS, argv, name)
    except ConfigError as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\n")
        sys.exit(1)


def fields_help(cfg: ml_collections.ConfigDict, name: str = "config") -> str:
    """A table of every field as `--NAME.field = value`, for `--help`."""
    rows = flat(cfg)
    width = max(len(k) for k in rows) + len(name) + 3
    return "\n".join([f"config fields (set with --{name}.FIELD=VALUE):"] +
                     [f"  {'--' + name + '.' + k:<{width}} = {v!r}" for k, v in rows.items()])


def _within(value, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    return above and below


def _get(cfg: ml_collections.ConfigDict, field: str):
    for part in field.split("."):
        cfg = cfg[part]
    return cfg


def validate(cfg: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raises a one-line ConfigError for the first field that cannot run: a field missing, a number outside
    its range (`RANGES`), probabilities that do not sum to 1, an unknown name (variant, preset, law, ...),
    an image size the codec cannot tile, a weights path that does not exist, latents made for another model;
    with `device_count`, a mesh or batch that does not fit the devices. Reads no weights, compiles nothing."""
    have = flat(cfg)
    missing = [k for k in flat(defaults()) if k not in have]
    if missing:
        raise ConfigError(f"config.{missing[0]} is missing (a config file builds on iconface_jax.config.defaults(); "
                          f"a stored one goes through config.upgrade)")
    if not cfg.workdir:
        raise ConfigError("config.workdir is empty: name the run's directory")
    for field, interval in RANGES.items():
        value = _get(cfg, field)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and _within(value, interval)):
            raise ConfigError(f"config.{field} must lie in {interval}, got {value!r}")
    if cfg.mesh.data != -1 and cfg.mesh.data < 1:
        raise ConfigError(f"config.mesh.data must be -1 (every device not in fsdp) or >= 1, got {cfg.mesh.data}")
    for field in DISTRIBUTIONS:
        probs = _get(cfg, field)
        if not probs or any(not 0 <= p <= 1 for p in probs) or abs(sum(probs) - 1) > 1e-6:
            raise ConfigError(f"config.{field} must be probabilities in [0, 1] summing to 1, got {tuple(probs)}")
    degradation = cfg.data.degradation
    if len(degradation.presets) != len(degradation.preset_probs):
        raise ConfigError(f"config.data.degradation.presets {tuple(degradation.presets)} and preset_probs "
                          f"{tuple(degradation.preset_probs)} differ in length")
    names = [("model.backbone.preset", cfg.model.backbone.preset, flux2.PRESETS),
             ("model.init", cfg.model.init, flux2.INITS),
             ("model.remat", cfg.model.remat, ("none", *REMAT_POLICIES)),
             ("model.lora.targets", cfg.model.lora.targets, lora.PRESETS),
             ("model.autoencoder.kind", cfg.model.autoencoder.kind, ("vae", "patchify")),
             ("data.source", cfg.data.source, _sources(cfg.data)),
             ("train.sigma_law", cfg.train.sigma_law, flow.SIGMA_LAWS)]
    names += [("data.degradation.presets", p, degradation.params) for p in degradation.presets]
    for field, value, allowed in names:
        if value not in allowed:
            raise ConfigError(f"config.{field} {value!r} is not one of {' | '.join(allowed)}")
    try:
        Precision.named(cfg.model.precision)
    except ValueError as e:
        raise ConfigError(f"config.model.precision: {e}") from None
    arch = set(flux2.Flux2Config.__dataclass_fields__)
    for field in cfg.model.backbone:
        if field != "preset" and field not in arch:
            raise ConfigError(f"config.model.backbone.{field}: not a Flux2Config field; "
                              f"{_did_you_mean(field, arch)}")
    try:
        iconface.IConFaceConfig(**cfg.model.iconface)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model.iconface: {e}") from None
    tile = _codec_tile(cfg.model.autoencoder)
    if cfg.data.resolution % tile:
        raise ConfigError(f"config.data.resolution={cfg.data.resolution}: the {cfg.model.autoencoder.kind} codec "
                          f"tiles images in {tile} px squares; use a multiple of {tile}")
    for field in ("model.weights", "model.autoencoder.weights", "model.face_encoder.weights",
                  "model.text.embeddings", "model.lora_init"):
        path = _get(cfg, field)
        if path and not storage.path(path).exists():
            raise ConfigError(f"config.{field}: {path} does not exist")
    if cfg.data.latents:
        try:
            latents.LatentStore(cfg.data.latents).check(cfg)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
    if device_count is not None:
        n, data, fsdp = device_count, cfg.mesh.data, cfg.mesh.fsdp
        if (data * fsdp if data != -1 else fsdp) > n or (data != -1 and data * fsdp != n) or n % fsdp:
            raise ConfigError(f"config.mesh data={data} fsdp={fsdp} does not fit the {n} devices")
        if cfg.train.batch_size % n:
            raise ConfigError(f"config.train.batch_size={cfg.train.batch_size} is not divisible by the {n} devices")


def _sources(data: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The data sources: each has its section of fields in `data` (catalog.make_source reads it)."""
    return tuple(k for k, v in data.items() if isinstance(v, ml_collections.ConfigDict) and k != "degradation")


def _codec_tile(autoencoder: ml_collections.ConfigDict) -> int:
    """The side of the pixel squares the codec turns into one token each."""
    if autoencoder.kind == "patchify":
        return autoencoder.factor
    return vae.DEFAULT.scale_factor * vae.DEFAULT.patch_size[0]


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, sorted(options), n=1)
    return f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(sorted(options))}"


def upgrade(stored: dict) -> ml_collections.ConfigDict:
    """A stored config (a workdir's config.json) of any release as a current config: the defaults it predates
    filled in as the run trained, then `defaults()` for every field still missing."""
    stored = ml_collections.ConfigDict(stored).to_dict()  # a deep copy
    version = stored.get("config_version", 0)
    if version > CONFIG_VERSION:
        raise ConfigError(f"config_version {version} is newer than this release's ({CONFIG_VERSION}); update "
                          "iconface_jax")
    if version < 1:  # written before config_version: what each field missing then meant
        model = stored.setdefault("model", {})
        # memory_readers did not exist: the scene tokens read the memory.
        model.setdefault("iconface", {}).setdefault("memory_readers", "scene")
        # synthetic.aligned did not exist: views with free roll, scale and shift.
        stored.setdefault("data", {}).setdefault("synthetic", {}).setdefault("aligned", False)
        # lora.targets did not exist: `feed_forward` chose between two sets.
        lora_cfg = model.setdefault("lora", {})
        feed_forward = lora_cfg.pop("feed_forward", False)
        lora_cfg.setdefault("targets", "flux2_klein_full" if feed_forward else "attention")
        # autoencoder.bands did not exist: pixel tokens.
        model.setdefault("autoencoder", {}).setdefault("bands", ())
    stored["config_version"] = CONFIG_VERSION
    cfg = defaults(stored.get("model", {}).get("iconface", {}).get("variant", "full"))
    cfg.update(_tuples(stored))
    return cfg


def _tuples(tree):
    """JSON's lists as the tuples configs hold."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    return tuple(_tuples(v) for v in tree) if isinstance(tree, list) else tree
