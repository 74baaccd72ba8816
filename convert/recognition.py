"""What the face-recognition converters (`convert.adaface`, `convert.arcface`) share: reading a PyTorch
state dict safely (or a safetensors file), locating the network's key prefix, the conv / linear /
BatchNorm entries of a conversion plan, and the convert-and-write step behind their command line.

PyTorch pickles are read with `torch.load(weights_only=True)` (tensors and plain containers only); a
file that needs arbitrary unpickling is refused, naming the Python objects it holds, unless
`--allow-unsafe-pickle` is given (only for files you trust). `num_batches_tracked` counters are
dropped. Parameters are stored in float32 by default (the models are small; `load(...,
param_dtype=jnp.bfloat16)` casts on load).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from convert.common import ConversionError, Entry, check_plan, cli, materialise, open_source
from convert.safetensors_file import Reader, TensorInfo
from iconface_jax import weights

UNSAFE_FLAG = "--allow-unsafe-pickle"
UNSAFE_HELP = "allow full (unsafe) unpickling of a PyTorch file that holds more than tensors; only for files you trust"
IGNORED_SUFFIXES = (".num_batches_tracked",)
# Prefixes under which training code nests a network: Lightning's `model.`, DataParallel's `module.`.
PREFIXES = ("", "model.", "module.", "model.module.")

# {our parameter name: (official state-dict key, official shape, transform or None)}
OfficialPlan = dict[str, tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray] | None]]


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch conv weight OIHW -> Flax kernel HWIO."""
    return np.transpose(w, (2, 3, 1, 0))


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> Flax kernel (in, out)."""
    return w.T


def add_batchnorm(plan: OfficialPlan, src: str, dst: str, channels: int, affine: bool = True) -> None:
    """Adds a BatchNorm's entries (`weight`/`bias` when affine, running statistics) to `plan`."""
    names = (("weight", "scale"), ("bias", "bias")) if affine else ()
    for theirs, ours in names + (("running_mean", "mean"), ("running_var", "var")):
        plan[f"{dst}.{ours}"] = (f"{src}.{theirs}", (channels,), None)


def plan_entries(official: OfficialPlan, prefix: str) -> dict[str, Entry]:
    """The official plan as `common.Entry`s over the source's keys (`prefix` + official key)."""
    return {name: Entry((prefix + key,), (shape,), fn or (lambda x: x)) for name, (key, shape, fn) in official.items()}


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
    except Exception as e:
        error = e
    unsafe: list[str] = []
    if not allow_unsafe_pickle:
        try:
            unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:
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


def _state_dict_reader(path: str, allow_unsafe_pickle: bool, ignored: Callable[[str], bool]) -> Reader:
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
    return _ArrayReader(path, {k: _to_numpy(path, k, v) for k, v in state.items() if not ignored(k)})


def open_reader(src: str, allow_unsafe_pickle: bool = False,
                ignored: Callable[[str], bool] = lambda key: False) -> Reader:
    """A reader over the tensors of `src` (a torch pickle or a safetensors file), keyed as in the file,
    without `num_batches_tracked` counters and the keys `ignored` names."""
    if not os.path.exists(src):
        raise ConversionError(f"{src}: no such file or directory")

    def skip(key: str) -> bool:
        return key.endswith(IGNORED_SUFFIXES) or ignored(key)

    if _is_safetensors(src):
        reader = open_source(src)
        return Reader({k: v for k, v in reader.infos.items() if not skip(k)})
    return _state_dict_reader(src, allow_unsafe_pickle, skip)


def source_name(reader: Reader, src: str | None) -> str:
    """`src`, or the files behind `reader`, for messages."""
    return src or ", ".join(sorted({i.path for i in reader.infos.values()})) or "source"


def find_prefix(keys: Iterable[str], roots: Sequence[str]) -> str:
    """The prefix (of `PREFIXES`) under which most keys start with one of the network's top-level `roots`;
    keys outside it are then reported as unexpected."""
    keys = list(keys)

    def hits(prefix: str) -> int:
        return sum(k.startswith(prefix) and k[len(prefix):].startswith(tuple(roots)) for k in keys)

    return max(PREFIXES, key=hits)


def block_indices(keys: Iterable[str], prefix: str, container: str) -> set[int]:
    """The N of every `prefix + container + '.N.*'` key (the residual units a checkpoint holds)."""
    head = prefix + container + "."
    indices = set()
    for k in keys:
        parts = k[len(head):].split(".") if k.startswith(head) else []
        if len(parts) > 1 and parts[0].isdigit():
            indices.add(int(parts[0]))
    return indices


def convert(src: str, dst: str, dtype: np.dtype, family: str,
            plan: Callable[[Reader, str], tuple[dict, dict[str, Entry]]], describe: Callable[[dict], str], *,
            allow_unsafe_pickle: bool = False, ignored: Callable[[str], bool] = lambda key: False, log=print) -> dict:
    """Reads, checks and writes one conversion and returns the stored config; nothing is written on error.

    `plan(reader, src)` gives (config dict, entries); `describe(config)` the line logged about the network.
    """
    if os.path.exists(dst):
        raise ConversionError(f"destination {dst} already exists; remove it or choose another path")
    reader = open_reader(src, allow_unsafe_pickle, ignored)
    config, entries = plan(reader, src)
    log(f"{src}: {describe(config)}", file=sys.stderr)
    check_plan(reader, entries)
    params = materialise(reader, entries, np.dtype(dtype), desc=f"converting {os.path.basename(src.rstrip('/'))}")
    weights.save(dst, family, config, params)
    return config


def main(description: str, convert_fn: Callable[..., object], argv: Sequence[str] | None) -> int:
    """The recognisers' command line: `common.cli` with float32 by default and `--allow-unsafe-pickle`."""
    return cli(description, convert_fn, argv, default_dtype="float32", flags=[(UNSAFE_FLAG, UNSAFE_HELP)])

