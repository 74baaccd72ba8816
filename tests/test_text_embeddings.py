"""Prompt embeddings: the converter against diffusers' own encoding on a tiny local Qwen3, and the file format."""
from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import import_or_skip

pytestmark = pytest.mark.parity

torch = import_or_skip("torch")
transformers = import_or_skip("transformers")
tokenizers = import_or_skip("tokenizers")
import_or_skip("diffusers")

from convert import text_embeddings
from iconface_jax import text

LAYERS = (1, 2, 3)
MAX_LENGTH = 16
HIDDEN = 32
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "[UNK]"]
# Qwen3's template reduced to what the encoder uses: messages, the generation prompt, and the
# empty think block that `enable_thinking=False` adds.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> str:
    """A random 4-layer Qwen3 with a word-level tokenizer, saved as a local transformers directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    path = str(tmp_path_factory.mktemp("qwen3"))
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["user assistant " + text_embeddings.DEFAULT_PROMPT],
                            trainers.WordLevelTrainer(special_tokens=SPECIAL))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                         unk_token="[UNK]", chat_template=CHAT_TEMPLATE).save_pretrained(path)
    config = transformers.Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(qwen3_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("embeds") / "prompt.npz")
    argv = ["--text-encoder", qwen3_dir, "--out", out, "--max-length", str(MAX_LENGTH),
            "--layers", ",".join(map(str, LAYERS))]
    assert text_embeddings.main(argv) == 0
    return out


def test_cli_matches_diffusers(qwen3_dir, converted):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    encoder = transformers.AutoModelForCausalLM.from_pretrained(qwen3_dir, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3_dir, local_files_only=True)
    prompt, empty = text.load_prompt_embeddings(converted, dim=len(LAYERS) * HIDDEN)
    for stored, words in [(prompt, text_embeddings.DEFAULT_PROMPT), (empty, "")]:
        want = Flux2KleinPipeline._get_qwen3_prompt_embeds(encoder, tokenizer, words, max_sequence_length=MAX_LENGTH,
                                                            hidden_states_layers=LAYERS)
        assert stored.shape == (MAX_LENGTH, len(LAYERS) * HIDDEN)
        np.testing.assert_allclose(stored, want[0].detach().float().numpy(), rtol=0, atol=1e-6)
    # The prompt fills (and is truncated to) all 16 tokens; the empty one is padded: both paths are covered.
    assert not np.allclose(prompt, empty)
    with np.load(converted) as data:
        assert str(data["prompt_text"]) == text_embeddings.DEFAULT_PROMPT
        assert tuple(data["layers"]) == LAYERS and int(data["max_length"]) == MAX_LENGTH


def _run(argv, capsys) -> tuple[int, str]:
    rc = text_embeddings.main(argv)
    return rc, capsys.readouterr().err


def test_missing_dir(tmp_path, capsys):
    missing, out = str(tmp_path / "nowhere"), tmp_path / "out.npz"
    rc, err = _run(["--text-encoder", missing, "--out", str(out)], capsys)
    assert rc == 1 and missing in err
    assert os.listdir(tmp_path) == []


def test_not_qwen3(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}')
    rc, err = _run(["--text-encoder", str(tmp_path), "--out", str(tmp_path / "out.npz")], capsys)
    assert rc == 1 and str(tmp_path / "config.json") in err and "llama" in err
    assert os.listdir(tmp_path) == ["config.json"]


def test_layer_too_deep(qwen3_dir, tmp_path, capsys):
    rc, err = _run(["--text-encoder", qwen3_dir, "--out", str(tmp_path / "out.npz"), "--layers", "1,5"], capsys)
    assert rc == 1 and qwen3_dir in err and "[5]" in err
    assert os.listdir(tmp_path) == []


def test_existing_out(qwen3_dir, tmp_path, capsys):
    out = tmp_path / "out.npz"
    out.write_bytes(b"keep")
    rc, err = _run(["--text-encoder", qwen3_dir, "--out", str(out)], capsys)
    assert rc == 1 and str(out) in err
    assert out.read_bytes() == b"keep" and os.listdir(tmp_path) == ["out.npz"]


def test_overwrite(qwen3_dir, converted, tmp_path):
    out = tmp_path / "out.npz"
    out.write_bytes(b"old")
    argv = ["--text-encoder", qwen3_dir, "--out", str(out), "--max-length", str(MAX_LENGTH), "--layers", "1,2,3",
            "--overwrite"]
    assert text_embeddings.main(argv) == 0
    assert os.listdir(tmp_path) == ["out.npz"]  # no temporary file left beside it
    for got, want in zip(text.load_prompt_embeddings(str(out)), text.load_prompt_embeddings(converted)):
        np.testing.assert_array_equal(got, want)


def test_load_round_trip_and_errors(tmp_path):
    prompt, empty = text.random_prompt_embeddings(5, 12, seed=3)
    path = str(tmp_path / "e.npz")
    text.save_prompt_embeddings(path, prompt, empty, prompt_text="p", layers=(1,), max_length=5, encoder_dtype="x")
    got_prompt, got_empty = text.load_prompt_embeddings(path, dim=12)
    np.testing.assert_array_equal(got_prompt, prompt)
    np.testing.assert_array_equal(got_empty, empty)
    assert got_prompt.dtype == np.float32
    with pytest.raises(text.PromptEmbeddingsError, match="expected 7 channels"):
        text.load_prompt_embeddings(path, dim=7)

    no_empty = str(tmp_path / "no_empty.npz")
    np.savez(no_empty, prompt=prompt)
    with pytest.raises(text.PromptEmbeddingsError, match=r"no_empty\.npz: missing array 'empty'"):
        text.load_prompt_embeddings(no_empty)
    mismatched = str(tmp_path / "mismatched.npz")
    np.savez(mismatched, prompt=prompt, empty=empty[:4])
    with pytest.raises(text.PromptEmbeddingsError, match=r"'empty' has shape \(4, 12\)"):
        text.load_prompt_embeddings(mismatched)
    with pytest.raises(text.PromptEmbeddingsError, match="no such file"):
        text.load_prompt_embeddings(str(tmp_path / "absent.npz"))


def test_random_prompt_embeddings_deterministic():
    a = text.random_prompt_embeddings(7, 16, seed=1)
    b = text.random_prompt_embeddings(7, 16, seed=1)
    c = text.random_prompt_embeddings(7, 16, seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape == a[1].shape == (7, 16) and a[0].dtype == np.float32
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[0], c[0])


def test_klein_repository_layout(qwen3_dir, converted, tmp_path):
    """A FLUX.2-klein repository directory is read through its text_encoder/ and tokenizer/ subdirectories."""
    repo = tmp_path / "klein"
    repo.mkdir()
    (repo / "text_encoder").symlink_to(qwen3_dir)
    (repo / "tokenizer").symlink_to(qwen3_dir)
    out = str(tmp_path / "out.npz")
    argv = ["--text-encoder", str(repo), "--out", out, "--max-length", str(MAX_LENGTH), "--layers", "1,2,3"]
    assert text_embeddings.main(argv) == 0
    for got, want in zip(text.load_prompt_embeddings(out), text.load_prompt_embeddings(converted)):
        np.testing.assert_array_equal(got, want)
