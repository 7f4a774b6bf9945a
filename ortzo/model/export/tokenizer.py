"""The tokenizer of a trainable folder: `tokenizer.json` plus what encoding needs (start token,
padding id), read from the GGUF itself where the model came as one."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import OrtzoError
from .sources import Source

TOKENIZER = "tokenizer.json"


def export_tokenizer(source: Source, hf_dir: Path | None, out: Path) -> dict[str, Any]:
    """Save tokenizer.json and what encoding needs. GGUF settings come from the file itself,
    because transformers 4.57 misreads them (it turns on add_bos for SmolLM2)."""
    from transformers import AutoTokenizer

    if source.kind == "gguf":
        import gguf as gguf_lib

        gguf = Path(source.location)
        fields = gguf_lib.GGUFReader(str(gguf)).fields
        meta = _gguf_tokenizer_meta(fields)
        if meta["model"] == "llama":  # SentencePiece pieces + scores: transformers 4.57 builds a wrong Unigram
            backend = _spm_bpe_from_gguf(fields)
        else:
            backend = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).backend_tokenizer
        add_bos = bool(meta.get("add_bos_token", False))
        bos, pad = meta.get("bos_token_id"), meta.get("padding_token_id", meta.get("eos_token_id"))
    else:
        tok = AutoTokenizer.from_pretrained(hf_dir)
        if not tok.is_fast:
            raise OrtzoError(f"{source.location}: only fast (tokenizers) tokenizers are supported")
        backend = tok.backend_tokenizer
        add_bos = bool(getattr(tok, "add_bos_token", False))
        bos, pad = tok.bos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    backend.save(str(out / TOKENIZER))
    return {"file": TOKENIZER, "add_bos": add_bos and bos is not None, "bos_id": bos,
            "pad_id": int(pad) if pad is not None else 0}


def _gguf_tokenizer_meta(fields: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"model": bytes(fields["tokenizer.ggml.model"].parts[-1]).decode()}
    for key in ("add_bos_token", "bos_token_id", "eos_token_id", "padding_token_id"):
        f = fields.get(f"tokenizer.ggml.{key}")
        if f is not None:
            meta[key] = f.parts[f.data[0]].tolist()[0]
    return meta


def _spm_bpe_from_gguf(fields: dict[str, Any]):  # -> tokenizers.Tokenizer
    """A SentencePiece-BPE vocabulary (pieces and scores, no merge list) as a `tokenizers` BPE.

    llama.cpp merges the adjacent pair whose joined piece scores highest; a BPE whose merges are
    every (left, right) split of every piece, ranked by the joined piece's score, does the same.
    User-defined pieces (runs of spaces, newlines) match the raw text first, as in llama.cpp.
    Characters outside the vocabulary fall back to <0xNN> byte pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tf = fields["tokenizer.ggml.tokens"]
    pieces = [bytes(tf.parts[i]).decode("utf-8") for i in tf.data]
    sf, tt = fields["tokenizer.ggml.scores"], fields["tokenizer.ggml.token_type"]
    scores = [float(sf.parts[i][0]) for i in sf.data]
    user_defined = [p for p, i in zip(pieces, tt.data) if int(tt.parts[i][0]) == 4]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece, score in zip(pieces, scores):
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], byte_fallback=True,
                               unk_token=pieces[int(unk.parts[unk.data[0]][0])] if unk else None))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in user_defined])
    return tok

