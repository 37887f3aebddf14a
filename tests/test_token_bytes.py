"""The bytes the constraint engine believes each token writes equal what the model's tokenizer
writes for it in context, for every token of every kind of tokenizer we load.

A grammar's mask is computed from those beliefs while the reply's text comes from the
tokenizer's decoder; where they differ, masks allow the wrong tokens (the 500 on a two-line
grammar, raw newlines inside JSON strings on the default model). The reference here is the
``tokenizers`` library's own decoding: a prefix decoded with and without the token, the
difference taken. A token that is only part of a UTF-8 character is decoded between tokens
that complete the character (single-byte tokens), so its bytes are checked exactly too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kobold_api.engine.constraints import GrammarVocabulary
from kobold_api.engine.tokenizer import Tokenizer

from tiny_gguf import write_tokenizer_gguf
from tiny_model import build_tokenizer

#: SentencePiece pieces beyond ASCII, so whole multi-byte characters are tokens too.
SPM_WORDS = ("é", "▁café", "日本", "▁→", "ü▁")
#: GGUF tokenizers by (architecture, vocabulary): transformers converts each family its own way
#: (``Sequence[ByteFallback, Fuse, Replace, ByteLevel, Strip]`` for a byte-level Llama file,
#: plain ``ByteLevel`` for Qwen 2, ``Replace``/``ByteFallback``/``Strip`` chains for SentencePiece).
GGUF_KINDS = [("llama", "gpt2"), ("qwen2", "gpt2"), ("granite", "gpt2"), ("llama", "spm"), ("gemma", "spm"),
              ("phi3", "spm")]
#: Completions tried around a partial character: bytes before it, bytes after it.
_LEADS = [b"", b"\xc2", b"\xe1", b"\xe1\x80", b"\xf1", b"\xf1\x80", b"\xf1\x80\x80"]
_TRAILS = [b"", b"\x80", b"\xa0", b"\x80\x80", b"\xa0\x80", b"\x80\x80\x80", b"\xa0\x80\x80"]


@pytest.fixture(scope="module")
def gguf_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizer folders converted from tiny GGUFs by the importer's own conversion (one child
    process for all of them: each would otherwise import transformers again)."""
    root = tmp_path_factory.mktemp("gguf-tokenizers")
    (root / "hf").mkdir()
    build_tokenizer(root / "hf", merges=4)
    jobs: list[tuple[str, Path, Path]] = []
    for family, vocab in GGUF_KINDS:
        name = f"{family}-{vocab}"
        path = write_tokenizer_gguf(root / f"{name}.gguf", family,
                                    hf_dir=root / "hf" if vocab == "gpt2" else None, words=SPM_WORDS)
        jobs.append((name, path, root / name))
    code = ("import sys\nfrom kobold_api.engine.importer.gguf_tokenizer import main\n"
            "for a, b in zip(sys.argv[1::2], sys.argv[2::2]):\n    assert main([a, b]) == 0, a\n")
    result = subprocess.run([sys.executable, "-c", code, *[str(p) for _, src, out in jobs for p in (src, out)]],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return {name: out for name, _, out in jobs}


def metaspace_tokenizer(out_dir: Path) -> Path:
    """A SentencePiece-style Hugging Face tokenizer: BPE with ``▁`` word starts and byte
    fallback, decoded by ``Sequence[ByteFallback, Metaspace, Fuse]``."""
    from tokenizers import Tokenizer as FastTokenizer, decoders, models, pre_tokenizers

    out_dir.mkdir(parents=True, exist_ok=True)
    pieces = ["<unk>", "<s>", "</s>", *[f"<0x{byte:02X}>" for byte in range(256)],
              "▁", "a", "b", "c", "é", "▁a", "▁b", "ab", "▁ab", "日", "本", "日本", "▁日本"]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    merges = [("▁", "a"), ("▁", "b"), ("a", "b"), ("▁a", "b"), ("日", "本"), ("▁", "日本")]
    tokenizer = FastTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(),
                                           decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                           decoders.Fuse()])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return out_dir


def check_every_token(model_dir: Path) -> dict[str, int]:
    """Compare belief and decoding for every token of the tokenizer in ``model_dir``; return
    how many tokens were checked each way (whole characters, completed partial ones, special)."""
    tokenizer = Tokenizer(model_dir)
    eos = [tokenizer.token_to_id(tokenizer.eos_token)] if tokenizer.token_to_id(tokenizer.eos_token) is not None else []
    believed = GrammarVocabulary(tokenizer, tokenizer.vocab_size, eos).tokenizer
    # A prefix of word tokens: after byte-fallback tokens, one invalid byte turns the whole run
    # of byte tokens into U+FFFD (the library's ByteFallback), which says nothing of the token.
    prefix = next(ids for ids in (tokenizer.encode(text, add_special_tokens=False) for text in ("ab", "the"))
                  if not any(tokenizer._tokenizer.id_to_token(i).startswith("<0x") for i in ids))
    base = tokenizer.decode(prefix, skip_special_tokens=False)
    single = {}
    for token_id in range(tokenizer.vocab_size):
        value = believed.decode_bytes([token_id])
        if len(value) == 1 and not believed.is_special_token(token_id):
            single.setdefault(value, token_id)
    counts = {"whole": 0, "partial": 0, "special": 0}
    for token_id in range(tokenizer.vocab_size):
        if believed.is_special_token(token_id):
            counts["special"] += 1
            continue
        value = believed.decode_bytes([token_id])
        assert value, f"token {token_id} ({tokenizer._tokenizer.id_to_token(token_id)!r}) writes nothing"
        lead, trail = _completion(value)
        context = [*prefix, *(single[bytes([b])] for b in lead), token_id, *(single[bytes([b])] for b in trail)]
        decoded = tokenizer.decode(context, skip_special_tokens=False)
        # Bytes no UTF-8 text holds (0xC0, 0xC1, 0xF5-0xFF) decode to U+FFFD whatever surrounds them.
        expected = base + (lead + value + trail).decode("utf-8", errors="replace")
        assert decoded == expected, (token_id, tokenizer._tokenizer.id_to_token(token_id), value, decoded)
        counts["partial" if lead or trail else "whole"] += 1
    for eos_id in eos:
        assert believed.is_special_token(eos_id)
    assert counts["whole"] > 0
    return counts


def _completion(value: bytes) -> tuple[bytes, bytes]:
    for lead in _LEADS:
        for trail in _TRAILS:
            try:
                (lead + value + trail).decode("utf-8")
            except UnicodeDecodeError:
                continue
            return lead, trail
    return b"", b""


@pytest.mark.parametrize("gguf_decoder", [False, True], ids=["byte-level", "gguf-chain"])
def test_tiny_byte_level_tokenizer(tmp_path: Path, gguf_decoder: bool) -> None:
    build_tokenizer(tmp_path, merges=4, gguf_decoder=gguf_decoder)
    counts = check_every_token(tmp_path)
    assert counts["partial"] == 115  # bytes 0x80-0xFF that some character holds, checked inside one


def test_sentencepiece_hugging_face_tokenizer_with_metaspace(tmp_path: Path) -> None:
    counts = check_every_token(metaspace_tokenizer(tmp_path))
    assert counts["partial"] == 115 and counts["whole"] >= 128 + 11


@pytest.mark.parametrize("kind", [f"{family}-{vocab}" for family, vocab in GGUF_KINDS])
def test_gguf_converted_tokenizers(gguf_tokenizers: dict[str, Path], kind: str) -> None:
    decoder = json.loads((gguf_tokenizers[kind] / "tokenizer.json").read_text())["decoder"]
    counts = check_every_token(gguf_tokenizers[kind])
    assert counts["partial"] == 115, (decoder, counts)


@pytest.mark.e2e
def test_default_model_tokenizer(default_model_dir: Path) -> None:
    """SmolLM2's tokenizer as converted from its GGUF: ``Sequence[ByteFallback, Fuse, Replace,
    ByteLevel]``, which llguidance's own reading took for UTF-8 letters (``Ġ`` as U+0120)."""
    counts = check_every_token(default_model_dir)
    assert counts["whole"] + counts["partial"] + counts["special"] == 49152
    assert counts["partial"] > 128


@pytest.mark.parametrize("kind", ["llama-spm", "gemma-spm", "phi3-spm", "llama-gpt2"])
def test_streamed_reply_keeps_the_space_before_its_first_word(gguf_tokenizers: dict[str, Path], kind: str) -> None:
    """These decoders drop the leading space of a whole text (``Strip``); decoded from the
    prompt's end, a continued story keeps it: "the" + " thin hen", not "thethin hen"."""
    from kobold_api.engine.tokenizer import IncrementalDecoder

    tokenizer = Tokenizer(gguf_tokenizers[kind])
    ids = tokenizer.encode("the thin hen", add_special_tokens=False)
    cut = next(k for k in range(len(ids)) if tokenizer.decode(ids[:k]) == "the")
    prompt, reply = ids[:cut], ids[cut:]
    assert tokenizer.decode(reply).startswith("thin")  # the decoder alone strips it
    decoder = IncrementalDecoder(tokenizer, context=prompt)
    assert "".join([*(decoder.add(token) for token in reply), decoder.flush()]) == " thin hen"
