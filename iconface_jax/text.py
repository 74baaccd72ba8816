"""Prompt embeddings: the stored Qwen3 encodings of the fixed restoration prompt and of the empty prompt.

The restoration prompt never changes, so the text encoder runs once, offline (`convert.text_embeddings`),
and the model reads the result from one `.npz` file:

- `prompt`, `empty`: (length, channels) float32, the FLUX.2 transformer's `encoder_hidden_states` for the
  prompt and for "" (classifier-free guidance's unconditional branch), padding positions included, as
  diffusers' `Flux2KleinPipeline` passes them;
- `prompt_text` (str), `layers` (int32, the Qwen3 hidden-state indices concatenated along channels),
  `max_length` (int32), `encoder_dtype` (str): how they were made.

Tiny configs, tests and the CPU demo have no Qwen3; `random_prompt_embeddings` stands in for the file.
"""
from __future__ import annotations

import io
import os
import tempfile
import zipfile
from collections.abc import Sequence

import numpy as np

from iconface_jax import storage

PROMPT, EMPTY = "prompt", "empty"


class PromptEmbeddingsError(ValueError):
    """A prompt-embeddings file that cannot be read or written; the message names the file and the array."""


def save_prompt_embeddings(path: str, prompt: np.ndarray, empty: np.ndarray, *, prompt_text: str,
                           layers: Sequence[int], max_length: int, encoder_dtype: str,
                           overwrite: bool = False) -> None:
    """Writes the local file atomically (temporary file renamed into place); refuses an existing `path` unless
    `overwrite`, and a `gs://` one (copy the file to the bucket afterwards)."""
    if storage.is_remote(path):
        raise PromptEmbeddingsError(f"{path}: prompt embeddings are written to a local file (renamed into place, "
                                    "which Cloud Storage cannot do atomically); copy it to the bucket afterwards")
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise PromptEmbeddingsError(f"{path} already exists; remove it or pass --overwrite")
    prompt, empty = np.asarray(prompt, np.float32), np.asarray(empty, np.float32)
    if prompt.ndim != 2 or empty.shape != prompt.shape:
        raise PromptEmbeddingsError(f"{path}: '{PROMPT}' {prompt.shape} and '{EMPTY}' {empty.shape} "
                                    "must both be (length, channels)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:  # a file object, so numpy does not append ".npz" to the name
            np.savez(f, **{PROMPT: prompt, EMPTY: empty}, prompt_text=np.array(prompt_text),
                     layers=np.array(layers, np.int32), max_length=np.array(max_length, np.int32),
                     encoder_dtype=np.array(encoder_dtype))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; this is a shareable data file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_prompt_embeddings(path: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, empty) of a local or gs:// file, each (length, channels) float32, checked; `dim`, if given, is
    the expected channel count."""
    if not storage.path(path).is_file():
        raise PromptEmbeddingsError(f"{path}: no such file (make it with `python -m convert.text_embeddings`)")
    try:
        remote = storage.is_remote(path)  # read whole: one request, not one per seek of the zip reader
        with np.load(io.BytesIO(storage.path(path).read_bytes()) if remote else path, allow_pickle=False) as data:
            held = sorted(data.files)
            arrays = {key: data[key] for key in (PROMPT, EMPTY) if key in held}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise PromptEmbeddingsError(f"{path}: not a readable .npz file ({e})") from None
    for key in (PROMPT, EMPTY):
        if key not in arrays:
            raise PromptEmbeddingsError(f"{path}: missing array '{key}' (holds {held})")
    prompt, empty = arrays[PROMPT], arrays[EMPTY]
    for key, a in arrays.items():
        if a.ndim != 2 or a.dtype.kind != "f":
            raise PromptEmbeddingsError(f"{path}: array '{key}' is {a.dtype} of shape {a.shape}, "
                                        "expected floating point (length, channels)")
        if dim is not None and a.shape[1] != dim:
            raise PromptEmbeddingsError(f"{path}: array '{key}' has shape {a.shape}, expected {dim} channels")
        if not np.all(np.isfinite(a)):
            raise PromptEmbeddingsError(f"{path}: array '{key}' holds non-finite values")
    if empty.shape != prompt.shape:
        raise PromptEmbeddingsError(f"{path}: array '{EMPTY}' has shape {empty.shape}, "
                                    f"but '{PROMPT}' has {prompt.shape}")
    return prompt.astype(np.float32), empty.astype(np.float32)


def random_prompt_embeddings(length: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed standard-normal (prompt, empty), each (length, dim) float32, determined by `seed`, and distinct."""
    if length < 1 or dim < 1:
        raise ValueError(f"length {length} and dim {dim} must be positive")
    both = np.random.default_rng(seed).standard_normal((2, length, dim), dtype=np.float32)
    return both[0], both[1]
