"""The tokenizer wrapper on SmolLM2's GGUF tokenizer, a folder copy of it, and streaming decode.

The independent reference is a byte-level BPE built here straight from the GGUF's token and merge
lists with the `tokenizers` library, shaped like SmolLM2's own tokenizer.json (single digits, then
byte-level): transformers' GGUF conversion must produce the same ids.
"""

from __future__ import annotations

import json

import pytest
import torch

from ladder.tokenizer import IncrementalDecoder, Tokenizer, TokenizerError

TEXTS = [
    "Hello world!",
    " leading space and  double  spaces\n\nnew paragraph\ttab",
    "Café naïve façade — “quotes” déjà vu",
    "emoji 🙂🎉👩‍💻 and CJK 日本語のテキスト",
    "in 2024 there were 1234567 cats, 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n<filename>x.py",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.fixture(scope="module")
def reference_bpe(smollm2):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    fields = smollm2.reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents()
    raw = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([t for t, ty in zip(tokens, types) if ty == 3])  # 3: control
    return raw


def test_smollm2_basics(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.encode("Hello")[0] != tok.bos_token_id  # SmolLM2's GGUF says add_bos_token=false


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_reference_ids(smollm2_tokenizer, reference_bpe, text):
    ids = smollm2_tokenizer.encode(text)
    assert ids == reference_bpe.encode(text).ids
    assert smollm2_tokenizer.decode(ids) == text


def test_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ids = tok.apply_chat_template(messages)
    text = tok.decode(ids)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>, <|im_end|> as single tokens
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.decode(no_prompt).endswith("Hi!<|im_end|>\n")
    assert "SmolLM" in tok.chat_text([{"role": "user", "content": "x"}])  # default system prompt


@pytest.fixture(scope="module")
def folder_tokenizer(smollm2_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    smollm2_tokenizer.save(path)
    return path, Tokenizer.from_folder(path)


def test_folder_copy_matches_gguf(smollm2_tokenizer, folder_tokenizer):
    _, tok = folder_tokenizer
    for text in TEXTS:
        assert tok.encode(text) == smollm2_tokenizer.encode(text)
    messages = [{"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(messages) == smollm2_tokenizer.apply_chat_template(messages)
    assert (tok.eos_token_ids, tok.bos_token_id, tok.vocab_size) == (
        smollm2_tokenizer.eos_token_ids, smollm2_tokenizer.bos_token_id,
        smollm2_tokenizer.vocab_size)


def test_checkpoint_folder_tokenizer_merges_eos_ids(folder_tokenizer, tmp_path):
    from safetensors.torch import save_file

    from ladder.loaders import CheckpointError, open_checkpoint

    src, _ = folder_tokenizer
    cfg = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
           "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"model.norm.weight": torch.ones(64)}, tmp_path / "model.safetensors")
    with pytest.raises(TokenizerError, match=f"{tmp_path}: no tokenizer.json"):
        open_checkpoint(tmp_path).tokenizer()
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert open_checkpoint(tmp_path).tokenizer().eos_token_ids == (2, 0)
    assert issubclass(CheckpointError, ValueError) and issubclass(TokenizerError, ValueError)


def test_no_chat_template_is_a_clear_error(folder_tokenizer, tmp_path):
    src, _ = folder_tokenizer
    for f in src.iterdir():
        if f.name != "chat_template.jinja":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template") as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [False, True], ids=["keep-special", "skip-special"])
def test_incremental_decoder_deltas_join_to_decode(smollm2_tokenizer, text, skip):
    tok = smollm2_tokenizer
    ids = tok.encode(text)
    dec = tok.incremental_decoder(skip_special_tokens=skip)
    deltas = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == dec.text == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_decoder_holds_partial_characters(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("a🎉b")
    assert len(ids) > 3  # the emoji is split into byte tokens
    dec = IncrementalDecoder(tok)
    deltas = [dec.feed(i) for i in ids]
    assert "🎉" in deltas and deltas.count("") >= 1  # emitted whole, once complete
    assert "".join(deltas) == "a🎉b"

    partial = IncrementalDecoder(tok)
    held = [partial.feed(i) for i in ids[:2]]  # "a" and the first byte(s) of the emoji
    assert held == ["a", ""]
    assert partial.flush() == tok.decode(ids[:2])[1:]  # flush releases the incomplete rest


def test_gguf_tokenizer_is_converted_once_then_read_from_the_cache(smollm2, tmp_path,
                                                                   monkeypatch):
    """The first load converts the GGUF's metadata (transformers) and keeps the result; the next
    reads it (the converter is not called) and is the same tokenizer; a cache entry someone else
    could have changed is not read."""
    import os

    import transformers

    from ladder.tokenizer import _load_cached, gguf_cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = Tokenizer.from_gguf(smollm2.path)
    cached = gguf_cache_dir(smollm2.path)
    assert cached.parent == tmp_path / "ladder-serve" / "tokenizers"
    assert (cached / "tokenizer.json").is_file() and not os.stat(cached).st_mode & 0o022
    auto = transformers.AutoTokenizer.from_pretrained

    def no_conversion(*args, **kw):
        assert "gguf_file" not in kw, "converted again: the cache was not read"
        return auto(*args, **kw)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_conversion)
    again = Tokenizer.from_gguf(smollm2.path)
    for text in TEXTS:
        assert again.encode(text) == first.encode(text)
        assert again.decode(first.encode(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert again.apply_chat_template(messages) == first.apply_chat_template(messages)
    assert (again.eos_token_ids, again.bos_token_id, again.vocab_size, again.max_token_chars) == (
        first.eos_token_ids, first.bos_token_id, first.vocab_size, first.max_token_chars)
    (cached / "tokenizer.json").chmod(0o666)  # others may write it: not trusted
    assert _load_cached(cached) is None
    (cached / "tokenizer.json").chmod(0o644)
    cached.chmod(0o777)
    assert _load_cached(cached) is None
    cached.chmod(0o755)
    assert _load_cached(cached) is not None
