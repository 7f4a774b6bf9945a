"""Tiny random causal LMs of each family Optimum exports, with a real (trained-on-the-spot) BPE
tokenizer: each exports in seconds."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

WORDS = ("the film was great terrible good bad movie acting plot story it a and of to is "
         "boring wonderful awful brilliant dull negative positive Yes No Question Answer Review Sentiment It "
         "was").split()
VOCAB = 512
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, bos_token_id=0, eos_token_id=1)


def save_tiny_tokenizer(folder: Path) -> int:
    """A byte-level BPE trained on WORDS, saved as a fast tokenizer; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 50 + [f" {w}" for w in WORDS] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return tok.get_vocab_size()


def _save(model: Any, folder: Path, norm_mean: float = 1.0) -> Path:
    """Randomize norms and biases, then save the model with the tiny tokenizer.

    Constant norms (all ones) or biases (all zeros) would be merged into one initializer by the
    exporter, and a zero bias would hide a wrongly named or transposed one."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.normal_(norm_mean if name.endswith("weight") else 0.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


def _build(cls_name: str, cfg_name: str, folder: Path, seed: int, norm_mean: float = 1.0, **cfg: Any) -> Path:
    import torch
    import transformers

    config = getattr(transformers, cfg_name)(**cfg)
    torch.manual_seed(seed)
    return _save(getattr(transformers, cls_name)(config), folder, norm_mean)


def make_tiny_llama(folder: Path, seed: int = 0, tie: bool = True) -> Path:
    return _build("LlamaForCausalLM", "LlamaConfig", folder, seed, vocab_size=VOCAB, num_key_value_heads=2,
                  tie_word_embeddings=tie, **SIZES)


def make_tiny_llama_genai(folder: Path, seed: int = 0) -> Path:
    """A Llama whose heads are 16 wide, as onnxruntime-genai's GroupQueryAttention needs on CPU."""
    return _build("LlamaForCausalLM", "LlamaConfig", folder, seed, vocab_size=VOCAB, num_key_value_heads=2,
                  tie_word_embeddings=False, **SIZES | {"hidden_size": 64, "intermediate_size": 128})


def make_tiny_gemma3(folder: Path, seed: int = 0) -> Path:
    """No position_ids in Optimum's config, a scaled tied embedding, a sliding window of 4, and
    norms that scale by (1 + weight), hence weights around 0."""
    return _build("Gemma3ForCausalLM", "Gemma3TextConfig", folder, seed, norm_mean=0.0, vocab_size=VOCAB,
                  num_key_value_heads=2, head_dim=8, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True, pad_token_id=1,
                  **SIZES)


def make_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    """Conv1D weights stored [in, out], learned positions (wpe), tied head."""
    return _build("GPT2LMHeadModel", "GPT2Config", folder, seed, vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                  n_inner=64, n_positions=256, bos_token_id=0, eos_token_id=1)


def make_tiny_opt(folder: Path, seed: int = 0) -> Path:
    """Learned positions offset by 2; word_embed_proj_dim < hidden_size adds project_in/project_out."""
    return _build("OPTForCausalLM", "OPTConfig", folder, seed, vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=16,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1)


def make_tiny_qwen2(folder: Path, seed: int = 0) -> Path:
    """q/k/v biases, tied head."""
    return _build("Qwen2ForCausalLM", "Qwen2Config", folder, seed, vocab_size=VOCAB, num_key_value_heads=2,
                  tie_word_embeddings=True, **SIZES)


def make_tiny_qwen3(folder: Path, seed: int = 0) -> Path:
    """q/k norms, untied head."""
    return _build("Qwen3ForCausalLM", "Qwen3Config", folder, seed, vocab_size=VOCAB, num_key_value_heads=2,
                  head_dim=8, tie_word_embeddings=False, **SIZES)


def make_tiny_phi3(folder: Path, seed: int = 0) -> Path:
    """Fused qkv_proj and gate_up_proj."""
    return _build("Phi3ForCausalLM", "Phi3Config", folder, seed, vocab_size=VOCAB, num_key_value_heads=2,
                  pad_token_id=1, tie_word_embeddings=False, **SIZES)


def make_tiny_mistral(folder: Path, seed: int = 0) -> Path:
    """A sliding window shorter than the test batch."""
    return _build("MistralForCausalLM", "MistralConfig", folder, seed, vocab_size=VOCAB, num_key_value_heads=2,
                  sliding_window=4, tie_word_embeddings=False, **SIZES)


def make_tiny_gpt_neox(folder: Path, seed: int = 0) -> Path:
    """embed_in/embed_out names, fused query_key_value, partial rotary, parallel residual."""
    return _build("GPTNeoXForCausalLM", "GPTNeoXConfig", folder, seed, vocab_size=VOCAB, rotary_pct=0.5,
                  tie_word_embeddings=False, **SIZES)


def make_tiny_phi(folder: Path, seed: int = 0) -> Path:
    """The head has a bias; partial rotary; LayerNorm with biases."""
    return _build("PhiForCausalLM", "PhiConfig", folder, seed, vocab_size=VOCAB, partial_rotary_factor=0.5,
                  tie_word_embeddings=False, **SIZES)


def make_tiny_gemma2(folder: Path, seed: int = 0) -> Path:
    """A final logit soft-cap small enough to bend the scores (tanh(x / 2) x 2), attention soft-cap."""
    return _build("Gemma2ForCausalLM", "Gemma2Config", folder, seed, norm_mean=0.0, vocab_size=VOCAB,
                  num_key_value_heads=2, head_dim=8, sliding_window=4, final_logit_softcapping=2.0,
                  attn_logit_softcapping=5.0, tie_word_embeddings=True, pad_token_id=1, **SIZES)


def make_tiny_cohere(folder: Path, seed: int = 0) -> Path:
    """Logits scaled by a logit scale; tied; parallel attention and MLP."""
    return _build("CohereForCausalLM", "CohereConfig", folder, seed, vocab_size=VOCAB, num_key_value_heads=2,
                  logit_scale=0.25, tie_word_embeddings=True, pad_token_id=1, **SIZES)


FAMILIES: dict[str, Callable[..., Path]] = {
    "llama": make_tiny_llama, "gemma3": make_tiny_gemma3, "gpt2": make_tiny_gpt2, "opt": make_tiny_opt,
    "qwen2": make_tiny_qwen2, "qwen3": make_tiny_qwen3, "phi3": make_tiny_phi3, "mistral": make_tiny_mistral,
    "gpt_neox": make_tiny_gpt_neox, "phi": make_tiny_phi, "gemma2": make_tiny_gemma2, "cohere": make_tiny_cohere,
}


if __name__ == "__main__":  # `python tests/tiny.py OUT`: the tiny Llama as a trainable folder (make memory-table)
    import sys
    import tempfile

    from ortzo.model.export import export_model

    with tempfile.TemporaryDirectory() as tmp:
        export_model(str(make_tiny_llama(Path(tmp) / "hf")), sys.argv[1], force=True)
