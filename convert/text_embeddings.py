"""Encodes the fixed restoration prompt, and the empty prompt, with FLUX.2-klein's Qwen3 text encoder, once.

    python -m convert.text_embeddings --text-encoder DIR --out FILE [--prompt TEXT] [--tokenizer DIR]
        [--max-length 512] [--layers 9,18,27] [--dtype float32|bfloat16] [--device cpu] [--overwrite]

DIR is a local transformers Qwen3 directory (config.json and safetensors), or a FLUX.2-klein model
repository, whose `text_encoder/` and `tokenizer/` subdirectories are then used. The tokenizer is read
from DIR unless `--tokenizer` names another directory. Nothing is downloaded.

The encoding is diffusers' `Flux2KleinPipeline._get_qwen3_prompt_embeds`: the prompt as one user message
through the chat template (`add_generation_prompt=True, enable_thinking=False`), padded and truncated to
`max_length` tokens, Qwen3 run with that attention mask, and the hidden states at `layers` (index 0 is
the token embedding, k the output of decoder layer k) concatenated along channels, layer-major:
(max_length, len(layers) * hidden) = (512, 7680) for klein-4B's Qwen3-4B. The empty prompt is
classifier-free guidance's unconditional branch (the pipeline's default negative prompt ""). Both are
stored as float32 in one `.npz` file (format: `iconface_jax.text`).

The default prompt is the IConFace authors' (their released code's `cli.py`, used in both modes, as the paper
uses one prompt for restoration with and without references).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from convert.common import ConversionError
from iconface_jax import text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_PROMPT = "restore a high quality portrait photo of a person, natural skin, detailed face"
DEFAULT_LAYERS = (9, 18, 27)
DEFAULT_MAX_LENGTH = 512  # the pipeline's tokenizer_max_length
DTYPES = ("float32", "bfloat16")


def resolve(text_encoder: str, tokenizer: str | None) -> tuple[str, str]:
    """The text-encoder and tokenizer directories: DIR itself, or a klein repository's subdirectories."""
    if not os.path.isdir(text_encoder):
        raise ConversionError(f"{text_encoder}: no such directory")
    if not os.path.isfile(os.path.join(text_encoder, "config.json")) and os.path.isdir(
            os.path.join(text_encoder, "text_encoder")):
        tokenizer = tokenizer or os.path.join(text_encoder, "tokenizer")
        text_encoder = os.path.join(text_encoder, "text_encoder")
    tokenizer = tokenizer or text_encoder
    if not os.path.isdir(tokenizer):
        raise ConversionError(f"{tokenizer}: no such tokenizer directory")
    return text_encoder, tokenizer


def check_qwen3(model_dir: str, layers: Sequence[int]) -> None:
    """DIR's config.json describes a Qwen3 model deep enough for `layers`; checked before any weight is read."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: unreadable model config ({e}); "
                              f"is {model_dir} a Qwen3 model directory?") from None
    if config.get("model_type") != "qwen3":
        raise ConversionError(f"{path}: describes a {config.get('model_type')!r} model, not a Qwen3 ('qwen3') one")
    depth = config.get("num_hidden_layers")
    if not isinstance(depth, int):
        raise ConversionError(f"{path}: no integer 'num_hidden_layers'")
    bad = [k for k in layers if not 0 <= k <= depth]
    if bad:
        raise ConversionError(f"{path}: layers {bad} out of range; the model has {depth} decoder layers, "
                              f"so hidden-state indices run from 0 to {depth}")


def load(model_dir: str, tokenizer_dir: str, dtype: str,
         device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from local files only."""
    try:  # imported here: only this converter needs them, and they take seconds to import
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ConversionError(f"encoding with {model_dir} needs torch and transformers ({e})") from None

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{tokenizer_dir}: cannot load a tokenizer ({e})") from None
    if tokenizer.chat_template is None or tokenizer.pad_token is None:
        raise ConversionError(f"{tokenizer_dir}: the tokenizer needs a chat template and a pad token")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{model_dir}: cannot load the Qwen3 weights ({e})") from None
    return model.to(device).eval(), tokenizer


def encode(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int,
           layers: Sequence[int]) -> np.ndarray:
    """(max_length, len(layers) * hidden) float32 embeddings of one prompt, as `_get_qwen3_prompt_embeds`."""
    import torch

    chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    n_tokens = len(tokenizer(chat)["input_ids"])
    if n_tokens > max_length:  # the pipeline truncates silently; say so, as it cuts the end of the template
        print(f"warning: prompt is {n_tokens} tokens with its chat template, truncated to {max_length}",
              file=sys.stderr)
    inputs = tokenizer(chat, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"].to(model.device),
                    attention_mask=inputs["attention_mask"].to(model.device),
                    output_hidden_states=True, use_cache=False)
    # Channel j * hidden + h is layer layers[j]: diffusers' stack(dim=1).permute(0, 2, 1, 3).reshape.
    return torch.cat([out.hidden_states[k][0] for k in layers], dim=-1).float().cpu().numpy()


def convert(text_encoder: str, out: str, prompt: str = DEFAULT_PROMPT, tokenizer: str | None = None,
            max_length: int = DEFAULT_MAX_LENGTH, layers: Sequence[int] = DEFAULT_LAYERS,
            dtype: str = "float32", device: str = "cpu", overwrite: bool = False) -> None:
    """Encodes `prompt` and "" and writes both to `out`; every check runs before the model loads."""
    if os.path.exists(out) and not overwrite:
        raise ConversionError(f"{out} already exists; remove it or pass --overwrite")
    if max_length < 1 or not layers:
        raise ConversionError(f"max_length {max_length} must be positive and layers {list(layers)} non-empty")
    model_dir, tokenizer_dir = resolve(text_encoder, tokenizer)
    check_qwen3(model_dir, layers)
    model, tok = load(model_dir, tokenizer_dir, dtype, device)
    embeds = {t: encode(model, tok, t, max_length, layers) for t in (prompt, "")}
    text.save_prompt_embeddings(out, embeds[prompt], embeds[""], prompt_text=prompt, layers=layers,
                                max_length=max_length, encoder_dtype=dtype, overwrite=overwrite)


def _layers(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of integers") from None


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-encoder", required=True, help="Qwen3 model directory, or a FLUX.2-klein repository")
    parser.add_argument("--out", required=True, help="output .npz file")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the restoration prompt (default: %(default)r)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the text encoder's)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens, padded and truncated")
    parser.add_argument("--layers", type=_layers, default=DEFAULT_LAYERS, help="hidden-state indices, e.g. 9,18,27")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="Qwen3 compute dtype (stored: float32)")
    parser.add_argument("--device", default="cpu", help="torch device for Qwen3, e.g. cpu or cuda")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        convert(args.text_encoder, args.out, args.prompt, args.tokenizer, args.max_length, args.layers,
                args.dtype, args.device, args.overwrite)
    except (ConversionError, text.PromptEmbeddingsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
