"""A tiny random Llama with a real (trained-on-the-spot) BPE tokenizer: exports in seconds."""
from __future__ import annotations

from pathlib import Path

WORDS = ("the film was great terrible good bad movie acting plot story it a and of to is "
         "boring wonderful awful brilliant dull Yes No Question Answer Review Sentiment It was").split()


def make_tiny_llama(folder: Path, seed: int = 0, tie: bool = True) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 50 + [f" {w}" for w in WORDS] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # all-ones norms would be merged into one initializer by the exporter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def make_tiny_gemma3(folder: Path, seed: int = 0) -> Path:
    """Gemma 3's scaled embedding defeats Optimum's tied-weight de-duplication: a regression case."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                           sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                           tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    make_tiny_llama(folder / "_tok")  # borrow the BPE tokenizer files
    for f in (folder / "_tok").glob("*token*"):
        f.rename(folder / f.name)
    return folder
