"""The model's tokenizer: text <-> ids, the chat template, and streaming detokenization.

A thin wrapper over a Hugging Face fast tokenizer, built from a model folder's `tokenizer.json`
(+ `tokenizer_config.json`) or from a GGUF file's `tokenizer.ggml.*` metadata, which transformers
converts offline. The wrapper pins down what the engine relies on (eos ids as a tuple, chat prompts
as ids, no clean-up of spaces on decode) so that the rest of the code never touches transformers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class TokenizerError(ValueError):
    """The tokenizer cannot be built or cannot do what was asked; the message names the source."""


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, *, source: str | Path,
                 extra_eos_token_ids: Iterable[int] = ()):
        self._hf = hf_tokenizer
        self.source = str(source)
        eos = [hf_tokenizer.eos_token_id, *extra_eos_token_ids]
        # Generation stops at any of these: the tokenizer's eos plus the model's (e.g. Llama 3's
        # <|eot_id|> next to <|end_of_text|>).
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(e) for e in eos
                                                                  if e is not None))
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.vocab_size: int = len(hf_tokenizer)  # added tokens included

    @classmethod
    def from_folder(cls, folder: str | Path, *,
                    extra_eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json in this folder")
        from transformers import PreTrainedTokenizerFast

        try:
            hf = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises a zoo of types for bad files
            raise TokenizerError(f"{folder}: cannot load the tokenizer: {e}") from e
        return cls(hf, source=folder, extra_eos_token_ids=extra_eos_token_ids)

    @classmethod
    def from_gguf(cls, path: str | Path, *, extra_eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        """transformers converts the GGUF's tokenizer metadata (~6 s for SmolLM2's 49k tokens and
        merges on this machine, most of it parsing the file twice); the result is kept in a cache
        (`gguf_cache_dir`) and later loads of the same file read that (~0.3 s)."""
        path = Path(path)
        cached = gguf_cache_dir(path)
        hf = _load_cached(cached)
        if hf is None:
            from transformers import AutoTokenizer
            try:
                hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                   local_files_only=True)
            except Exception as e:
                raise TokenizerError(f"{path}: cannot build the tokenizer from GGUF metadata: "
                                     f"{e}") from e
            _store(hf, cached)
        return cls(hf, source=path, extra_eos_token_ids=extra_eos_token_ids)

    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (its vocabulary string's length: a bound,
        since byte-level and byte-fallback spellings are never shorter than the text), so a
        text longer than n times this has more than n tokens."""
        return max(map(len, self._hf.get_vocab()), default=1)

    @property
    def chat_template(self) -> str | None:
        return self._hf.chat_template or None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens` adds BOS where the model's tokenizer asks for it."""
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=False)

    def chat_text(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt the chat template renders for `messages`."""
        if not self.chat_template:
            raise TokenizerError(f"{self.source}: the model has no chat template; "
                                 "send a plain prompt instead of messages")
        try:
            return self._hf.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
        except Exception as e:  # the template's own raise_exception, or a jinja error
            raise TokenizerError(f"the chat template refused these messages: "
                                 f"{type(e).__name__}: {e}") from None

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for `messages` ({"role", "content"} dicts). The template writes any BOS
        itself, so none is added on top."""
        text = self.chat_text(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def grammar_tokenizer(self, n_vocab: int, eos_token_ids: Sequence[int]):
        """This tokenizer as llguidance's (ladder.engine.guided), over the model's `n_vocab`
        rows (ids past the tokenizer's own are never allowed), ending at `eos_token_ids`."""
        import llguidance.hf
        if n_vocab < self.vocab_size:
            raise TokenizerError(f"{self.source}: the tokenizer has {self.vocab_size} tokens, "
                                 f"more than the model's {n_vocab}")
        return llguidance.hf.from_tokenizer(self._hf, n_vocab=n_vocab,
                                            eos_token=list(eos_token_ids))

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (with the chat template), e.g. to
        give a converted model folder the tokenizer of the GGUF it came from."""
        self._hf.save_pretrained(str(folder))

    def incremental_decoder(self, *, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas whose concatenation is the full decode.

    Decoding one token at a time is wrong twice over: a byte-level token may hold half a UTF-8
    character, and SentencePiece decoders drop or add spaces depending on what precedes a token.
    So each step decodes a short window that starts at the last point known to be a character
    boundary, and emits what the newest tokens added to it -- nothing while the text ends in
    U+FFFD (an incomplete character). `flush()` releases whatever is held at the end.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: a character boundary
        self._read = 0  # tokens up to here have been emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def feed(self, token_id: int) -> str:
        """Add one token; return the new text it completes (possibly "")."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end, if any)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        delta = after[len(before):]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta


def gguf_cache_dir(path: Path) -> Path:
    """Where the tokenizer converted from GGUF file `path` is kept: $XDG_CACHE_HOME/ladder-serve/
    tokenizers/<key> (~/.cache when unset), the key naming the file (its real path, size and
    modification time) and the converting versions of transformers and tokenizers."""
    import hashlib
    import os

    import tokenizers
    import transformers
    st = path.stat()
    key = hashlib.sha256("\0".join(map(str, (
        path.resolve(), st.st_size, st.st_mtime_ns, transformers.__version__,
        tokenizers.__version__))).encode()).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ladder-serve" / "tokenizers" / key


def _load_cached(folder: Path) -> Any | None:
    """The cached tokenizer, or None when there is none, or when it (or its folder) could have
    been changed by someone else: then it is converted again, and not stored over theirs."""
    from ladder.private import unsafe_reason
    if not folder.is_dir() or any(unsafe_reason(p, directory=p.is_dir(), others_read=True)
                                  for p in (folder.parent, folder, *folder.iterdir())):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache entry: convert again
        return None


def _store(hf: Any, folder: Path) -> None:
    """Save `hf` into the cache: written to a temporary folder, renamed into place (a concurrent
    writer's identical copy may win; then ours is dropped). A cache that cannot be written is
    skipped: the next start converts again."""
    import shutil
    import tempfile
    try:
        folder.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    except OSError:
        return
    try:
        hf.save_pretrained(str(tmp))
        tmp.chmod(0o755)
        tmp.rename(folder)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
