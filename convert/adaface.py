"""Convert an official AdaFace IR checkpoint to the Flax layout of `iconface_jax.models.adaface`.

    python -m convert.adaface --src adaface_ir50_ms1mv2.ckpt --dst weights/adaface_ir50 [--dtype float32]

Sources: the official release (a PyTorch Lightning checkpoint: `state_dict` with `model.` prefixes,
beside the margin head's `head.kernel` and training state, all ignored), a bare state dict
(`.pt`/`.pth`, with or without the `model.` prefix) or a safetensors file. PyTorch pickles are read
with `torch.load(weights_only=True)` (tensors and plain containers only); a file that needs
arbitrary unpickling is refused unless `--allow-unsafe-pickle` is given (only for files you trust).

The architecture (IR-18/34/50/101) is inferred from the number of body units. The conversion is a
mechanical rename (`weight` -> `kernel` / `scale` / `negative_slope`, `running_mean` -> `mean`,
`running_var` -> `var`) plus layouts: conv OIHW -> HWIO, linear (out, in) -> (in, out). The model
flattens its last feature map in channel-major order, so the Linear rows need no permutation.
`num_batches_tracked` counters are dropped. Parameters are stored in float32 by default (the model
is small; `load(..., param_dtype=jnp.bfloat16)` casts on load).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np

from convert.common import ConversionError, Entry, check_plan, cli, materialise, open_source
from convert.safetensors_file import Reader, TensorInfo
from iconface_jax import weights
from iconface_jax.models.adaface import ARCHS, FAMILY, AdaFaceConfig

UNSAFE_FLAG = "--allow-unsafe-pickle"
IGNORED_PREFIXES = ("head.",)  # the training-time margin head (`head.kernel`)
IGNORED_SUFFIXES = (".num_batches_tracked",)


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _linear(w: np.ndarray) -> np.ndarray:
    return w.T  # (out, in) -> (in, out)


def _bn(plan: dict, src: str, dst: str, c: int, affine: bool = True) -> None:
    names = (("weight", "scale"), ("bias", "bias")) if affine else ()
    for theirs, ours in names + (("running_mean", "mean"), ("running_var", "var")):
        plan[f"{dst}.{ours}"] = (f"{src}.{theirs}", (c,), None)


def official_plan(config: AdaFaceConfig) -> dict[str, tuple[str, tuple[int, ...], object]]:
    """{our parameter name: (official state-dict key, official shape, transform or None)}."""
    plan: dict[str, tuple[str, tuple[int, ...], object]] = {}
    c0 = config.channels[0]
    plan["input_layer.0.kernel"] = ("input_layer.0.weight", (c0, 3, 3, 3), _conv)
    _bn(plan, "input_layer.1", "input_layer.1", c0)
    plan["input_layer.2.negative_slope"] = ("input_layer.2.weight", (c0,), None)
    index, in_ch = 0, c0
    for depth, n in zip(config.channels, config.units):
        for i in range(n):
            cin = in_ch if i == 0 else depth
            p = f"body.{index}"
            _bn(plan, f"{p}.res_layer.0", f"{p}.res_layer.0", cin)
            plan[f"{p}.res_layer.1.kernel"] = (f"{p}.res_layer.1.weight", (depth, cin, 3, 3), _conv)
            _bn(plan, f"{p}.res_layer.2", f"{p}.res_layer.2", depth)
            plan[f"{p}.res_layer.3.negative_slope"] = (f"{p}.res_layer.3.weight", (depth,), None)
            plan[f"{p}.res_layer.4.kernel"] = (f"{p}.res_layer.4.weight", (depth, depth, 3, 3), _conv)
            _bn(plan, f"{p}.res_layer.5", f"{p}.res_layer.5", depth)
            if cin != depth:
                plan[f"{p}.shortcut_layer.0.kernel"] = (f"{p}.shortcut_layer.0.weight", (depth, cin, 1, 1), _conv)
                _bn(plan, f"{p}.shortcut_layer.1", f"{p}.shortcut_layer.1", depth)
            index += 1
        in_ch = depth
    c, f = config.channels[-1], config.feature_size
    _bn(plan, "output_layer.0", "output_layer.0", c)
    plan["output_layer.3.kernel"] = ("output_layer.3.weight", (config.embed_dim, c * f * f), _linear)
    plan["output_layer.3.bias"] = ("output_layer.3.bias", (config.embed_dim,), None)
    _bn(plan, "output_layer.4", "output_layer.4", config.embed_dim, affine=False)
    return plan


# ----------------------------------------------------------------------------------------- sources


class _ArrayReader(Reader):
    """A `Reader` over tensors already in memory (from a torch pickle), keyed like the file."""

    def __init__(self, path: str, arrays: dict[str, np.ndarray]):
        super().__init__({k: TensorInfo(path, tuple(a.shape)) for k, a in arrays.items()})
        self._arrays = arrays

    def read(self, key: str) -> np.ndarray:
        return self._arrays[key]


def _is_safetensors(path: str) -> bool:
    if os.path.isdir(path) or path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _torch_load(path: str, allow_unsafe_pickle: bool):
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: reading a PyTorch checkpoint needs the `torch` package (pip install torch); "
                              "alternatively convert it to safetensors elsewhere") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except Exception as e:  # noqa: BLE001 - every failure becomes a message naming the file
        error = e
    unsafe: list[str] = []
    if not allow_unsafe_pickle:
        try:
            unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - not a zip checkpoint: fall back to torch's message
            text = str(error)
            if "Unsupported global" in text or "Weights only load failed" in text:
                unsafe = ["(see torch's message: " + text.split("WeightsUnpickler error:")[-1].strip()[:300] + ")"]
    if unsafe:
        raise ConversionError(
            f"{path}: refusing to unpickle: the file holds Python objects beyond plain tensors and containers "
            f"({', '.join(unsafe[:5])}{' ...' if len(unsafe) > 5 else ''}); loading it can run arbitrary code. "
            f"If you trust the file, pass {UNSAFE_FLAG}") from None
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint or safetensors file ({type(error).__name__}: "
                          f"{str(error).strip()[:300]})") from None


def _to_numpy(path: str, key: str, tensor) -> np.ndarray:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise ConversionError(f"{path}: entry {key!r} of the state dict is a {type(tensor).__name__}, not a tensor")
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy()  # torch cannot hand bfloat16 to numpy
    return tensor.numpy()


def _state_dict_reader(path: str, allow_unsafe_pickle: bool) -> Reader:
    obj = _torch_load(path, allow_unsafe_pickle)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]  # Lightning checkpoint; the other top-level entries are training state
    elif isinstance(obj, dict):
        state = obj
    else:
        raise ConversionError(f"{path}: not a checkpoint: holds a {type(obj).__name__}, expected a state dict "
                              "or a Lightning checkpoint with a 'state_dict'")
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise ConversionError(f"{path}: not a state dict: key {bad[0]!r} is not a string")
    return _ArrayReader(path, {k: _to_numpy(path, k, v) for k, v in state.items() if not _ignored(k)})


def _ignored(key: str) -> bool:
    bare = key[len("model."):] if key.startswith("model.") else key
    return key.startswith(IGNORED_PREFIXES) or bare.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES)


def open_reader(src: str, allow_unsafe_pickle: bool = False) -> Reader:
    """A reader over the model tensors of `src` (ignored entries already dropped), keyed as in the file."""
    if not os.path.exists(src):
        raise ConversionError(f"{src}: no such file or directory")
    if _is_safetensors(src):
        reader = open_source(src)
        return Reader({k: v for k, v in reader.infos.items() if not _ignored(k)})
    return _state_dict_reader(src, allow_unsafe_pickle)


def _source_name(reader: Reader, src: str | None) -> str:
    return src or ", ".join(sorted({i.path for i in reader.infos.values()})) or "source"


def infer_config(reader: Reader, src: str | None = None) -> tuple[AdaFaceConfig, str]:
    """(config, key prefix) of the AdaFace network in `reader`: the architecture from the body unit count."""
    keys = list(reader.infos)
    roots = ("input_layer.", "body.", "output_layer.")

    def hits(prefix: str) -> int:
        return sum(k.startswith(prefix) and k[len(prefix):].startswith(roots) for k in keys)

    # The prefix under which the network's tensors live; keys outside it are reported as unexpected.
    prefix = max(("", "model.", "module.", "model.module."), key=hits)
    units = set()
    for k in keys:
        parts = k[len(prefix):].split(".") if k.startswith(prefix) else []
        if len(parts) > 2 and parts[0] == "body" and parts[1].isdigit():
            units.add(int(parts[1]))
    if not units:
        raise ConversionError(f"{_source_name(reader, src)}: not an AdaFace IR checkpoint: no '{prefix}body.N.*' tensors "
                              f"(first keys: {keys[:3]})")
    total = max(units) + 1
    for arch, per_stage in ARCHS.items():
        if sum(per_stage) == total:
            return AdaFaceConfig(units=per_stage), prefix
    known = ", ".join(f"{a.upper().replace('_', '-')} ({sum(u)})" for a, u in ARCHS.items())
    raise ConversionError(f"{_source_name(reader, src)}: {total} body units ('{prefix}body.0' .. '{prefix}body.{total - 1}') "
                          f"match no known AdaFace architecture: {known}")


def plan(reader: Reader, src: str | None = None) -> tuple[dict, dict[str, Entry]]:
    """(config dict, {our parameter name: Entry over the source keys}) for the network in `reader`."""
    config, prefix = infer_config(reader, src)
    entries = {name: Entry((prefix + key,), (shape,), fn or (lambda x: x))
               for name, (key, shape, fn) in official_plan(config).items()}
    return config.to_dict(), entries


def convert(src: str, dst: str, dtype: np.dtype = np.dtype(np.float32), *, allow_unsafe_pickle: bool = False,
            log=print) -> AdaFaceConfig:
    """Reads, checks and writes one conversion; nothing is written on error."""
    if os.path.exists(dst):
        raise ConversionError(f"destination {dst} already exists; remove it or choose another path")
    reader = open_reader(src, allow_unsafe_pickle)
    config_dict, entries = plan(reader, src)
    config = AdaFaceConfig.from_dict(config_dict)
    log(f"{src}: AdaFace {config.arch.upper().replace('_', '-')} (body units per stage "
        f"{', '.join(map(str, config.units))})", file=sys.stderr)
    check_plan(reader, entries)
    params = materialise(reader, entries, np.dtype(dtype), desc=f"converting {os.path.basename(src.rstrip('/'))}")
    weights.save(dst, FAMILY, config_dict, params)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return cli(__doc__.split("\n\n")[0], convert, argv, default_dtype="float32",
               flags=[(UNSAFE_FLAG, "allow full (unsafe) unpickling of a PyTorch file that holds more than "
                                    "tensors; only for files you trust")])


if __name__ == "__main__":
    sys.exit(main())
