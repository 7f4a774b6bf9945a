"""The memory model against independent references: transformers' own parameter counts, the
bytes PyTorch saves for backward (saved-tensor hooks), published parameter counts of the
aliases' configs, hand-computed budgets, and the CLI's one-line errors."""
from __future__ import annotations

import pytest

from ortzo import memory
from ortzo.cli import main
from ortzo.errors import OrtzoError

# Tiny configs of every family, each with its awkward options: GQA, head_dim != hidden / heads,
# biases, untied heads, sliding windows, post-LN with a narrow embedding, sequential NeoX, partial
# rotary, a biased head, q/k norms, parallel attention and MLP, soft-caps and logit scales.
TINY = {
    "llama": ("llama", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                            head_dim=12)),
    "llama-untied-bias": ("llama", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6,
                                        num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True,
                                        mlp_bias=True)),
    "mistral": ("mistral", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                                head_dim=12, sliding_window=8)),
    "qwen2": ("qwen2", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2)),
    "qwen3": ("qwen3", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                            head_dim=12)),
    "gemma3": ("gemma3_text", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                                   head_dim=12, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention"] * 2)),
    "phi3": ("phi3", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                          pad_token_id=0)),
    "gemma2": ("gemma2", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                              head_dim=12, sliding_window=4, final_logit_softcapping=2.0, attn_logit_softcapping=5.0,
                              layer_types=["sliding_attention", "full_attention"] * 2)),
    "gemma2-untied-bias": ("gemma2", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6,
                                          num_key_value_heads=3, head_dim=8, sliding_window=16,
                                          final_logit_softcapping=None, attention_bias=True,
                                          tie_word_embeddings=False)),
    "cohere": ("cohere", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                              logit_scale=0.25)),
    "cohere-qk-norm-untied": ("cohere", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6,
                                             num_key_value_heads=3, use_qk_norm=True, attention_bias=True,
                                             tie_word_embeddings=False)),
    "phi": ("phi", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                        partial_rotary_factor=0.5)),
    "phi-qk-norm-tied": ("phi", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6,
                                     partial_rotary_factor=0.75, qk_layernorm=True, tie_word_embeddings=True)),
    "gpt2": ("gpt2", dict(n_embd=48, n_head=6, n_positions=64, n_inner=80)),
    "opt": ("opt", dict(hidden_size=48, ffn_dim=80, num_attention_heads=6, max_position_embeddings=64)),
    "opt-350m-like": ("opt", dict(hidden_size=48, ffn_dim=80, num_attention_heads=6, max_position_embeddings=64,
                                  word_embed_proj_dim=40, do_layer_norm_before=False)),
    "gpt_neox": ("gpt_neox", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6, rotary_pct=0.25,
                                  max_position_embeddings=64)),
    "gpt_neox-sequential": ("gpt_neox", dict(hidden_size=48, intermediate_size=80, num_attention_heads=6,
                                             rotary_pct=0.25, max_position_embeddings=64,
                                             use_parallel_residual=False, attention_bias=False)),
}
B, S = 3, 11  # the first row left-padded by 4 when padded


def _build(family: str, layers: int, **kw):
    """(config, random model) with dropout off, as the engines set it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **{"n_layer" if family == "gpt2" else "num_hidden_layers": layers}, **kw)
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    torch.manual_seed(0)
    return config, AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _model(name: str, layers: int = 2):
    """A tiny model of `name` in train mode."""
    family, kw = TINY[name]
    config, model = _build(family, len(kw.get("layer_types", [])) or layers, vocab_size=96, **kw)
    return config, model.train()


@pytest.mark.parametrize("name", TINY)
def test_parameter_count_is_transformers_count(name):
    config, model = _model(name)
    arch = memory.Arch.from_config(config.to_dict())
    assert memory.parameter_count(arch) == sum(p.numel() for p in model.parameters())  # tied: once
    assert memory.largest_parameter(arch) == max(p.numel() for p in model.parameters())
    assert memory.vector_count(arch) == sum(p.numel() for p in model.parameters() if p.ndim == 1)
    # config.json leaves out what equals the class default: the model must fill it in alike
    assert memory.Arch.from_config(config.to_diff_dict() | {"model_type": config.model_type}) == arch


def _saved_bytes(model, padded: bool, fraction: float, dtype) -> int:
    """Bytes of the unique storages autograd saves in the engines' scoring forward and loss,
    parameters excluded, counting the compute dtype and fp32: integer indices and the loss's
    float64 log-softmax over the candidates (b x 2 values) are left out, as the model leaves
    them out of this comparison."""
    import numpy as np
    import torch

    from ortzo.engines.torch_model import candidate_loss, checkpoint_layers, scores

    model.to(dtype)
    checkpoint_layers(model, fraction)
    mask = np.ones((B, S), np.int64)
    if padded:
        mask[0, :4] = 0
    feeds = {"input_ids": np.random.default_rng(0).integers(2, 96, (B, S)), "attention_mask": mask,
             "position_ids": np.maximum(mask.cumsum(1) - 1, 0), "score_index": np.arange(B) * S + S - 1,
             "score_ids": np.tile([3, 4], (B, 1))}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights and t.dtype in (dtype, torch.float32):
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        candidate_loss(scores(model, feeds), np.zeros(B, np.int64))
    return sum(seen.values())


CASES = [(name, padded, fraction, "float32") for name in TINY for padded in (True, False) for fraction in (0, 0.5)]
CASES += [(name, True, 0, "bfloat16") for name in ("llama", "gemma3", "gpt2", "gpt_neox", "gemma2",
                                                    "cohere-qk-norm-untied", "phi-qk-norm-tied")]


@pytest.mark.parametrize("name, padded, fraction, dtype", CASES)
def test_activations_are_what_autograd_saves(name, padded, fraction, dtype):
    """Exact, storage for storage. With checkpointing, a wrapped layer's input is saved (by
    torch.utils.checkpoint's input saver) and nothing inside it; Gemma 3 has 4 layers so that
    each of its two rotary tables is still saved by a layer that is not wrapped (a table only
    wrapped layers use is held by the checkpoint's closure: alive, but not a saved tensor)."""
    import torch

    config, model = _model(name)
    measured = _saved_bytes(model, padded, fraction, getattr(torch, dtype))
    e = memory.estimate(config.to_dict(), B, S, method="bp", checkpoint_fraction=fraction, dtype=dtype,
                        padded=padded)
    predicted = e.terms["activations kept"] - e.activations["indices"] + e.terms["logits"]
    assert predicted == measured
    assert e.checkpointed == round(fraction * config.num_hidden_layers)


def test_configs_without_layer_types_get_the_class_pattern():
    """Older Gemma 2 and Gemma 3 config.json files have no layer_types: the memory model
    derives them as the config classes do (Gemma 2 alternates, sliding first; Gemma 3 makes
    every 6th layer global)."""
    from transformers import AutoConfig

    for family, kw in (("gemma2", {}), ("gemma3_text", {"sliding_window_pattern": 6})):
        config = AutoConfig.for_model(family, num_hidden_layers=7, sliding_window=8).to_dict()
        older = {k: v for k, v in config.items() if k != "layer_types"} | kw
        assert memory.Arch.from_config(older) == memory.Arch.from_config(config)


def test_checkpointed_layers_keep_their_input_only():
    config, _ = _model("llama", layers=4)
    full = memory.estimate(config.to_dict(), 8, 64, method="bp")
    half = memory.estimate(config.to_dict(), 8, 64, method="bp", checkpoint_fraction=0.5)
    assert half.layer_bytes[:2] == (4 * 8 * 64 * 48,) * 2 and half.layer_bytes[2:] == full.layer_bytes[2:]
    assert half.terms["recompute (one layer)"] == full.layer_bytes[0]
    assert half.terms["activations kept"] < full.terms["activations kept"] and half.total < full.total


# Published parameter counts: model cards, and the Pythia paper's table 1. They check the
# hand-typed [config] tables of export/.
PUBLISHED = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
             "gpt2-xl": 1_557_611_200, "pythia-160m": 162_322_944, "pythia-410m": 405_334_016,
             "pythia-1b": 1_011_781_632, "pythia-1.4b": 1_414_647_808, "pythia-2.8b": 2_775_208_960,
             "pythia-6.9b": 6_857_302_016, "pythia-12b": 11_846_072_320, "llama2-7b": 6_738_415_616,
             "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192, "qwen2.5-0.5b": 494_032_768,
             "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("alias, count", PUBLISHED.items())
def test_alias_configs_give_published_sizes(alias, count):
    assert memory.parameter_count(memory.Arch.from_config(memory.alias_config(alias))) == count


def test_every_family_size_has_a_config():
    assert all(memory.alias_config(a) for sizes in memory.SIZES.values() for a in sizes)
    wrapped = {"model_type": "gemma3", "text_config": memory.alias_config("gemma3-1b") | {"model_type": None}}
    assert memory.Arch.from_config(wrapped) == memory.Arch.from_config(memory.alias_config("gemma3-1b"))


def test_parse_size():
    assert memory.parse_size("17GB") == 17 * 10**9
    assert memory.parse_size("16GiB") == 16 * 2**30
    assert memory.parse_size(" 1.5 mib ") == 3 * 2**19
    assert memory.parse_size("1000") == 1000
    for bad in ("GB", "17 GiBs", "-1GB", "1e9"):
        with pytest.raises(OrtzoError, match="bad memory size"):
            memory.parse_size(bad)


GPT2 = memory.SIZES["gpt2"]


def test_budget_picks_the_largest_that_fits_by_hand():
    """At one token, activations are a few kB: ort-mezo in fp32 holds its runtime, tokenizer
    and 4 bytes a parameter, bp with AdamW its runtime, tokenizer, 16 bytes a parameter
    (weights, gradients, two moments) and AdamW's two temporaries of the largest tensor (the
    50257 x h embedding)."""
    tokenizer = memory.TOKENIZER * 50257
    by_hand = {"ort-mezo": lambda p, h: memory.RUNTIME["ort-mezo"] + tokenizer + 4 * p,
               "bp": lambda p, h: memory.RUNTIME["bp"] + tokenizer + 16 * p + 2 * 4 * 50257 * h}
    for name, h in zip(GPT2, (768, 1024, 1280, 1600)):
        for method, total in by_hand.items():
            e = memory.estimate(memory.alias_config(name), 1, 1, method=method)
            assert total(PUBLISHED[name], h) <= e.total < total(PUBLISHED[name], h) + 2**20
    for method, per_param in (("ort-mezo", 4), ("bp", 16)):
        for params, picked in ((100e6, None), (420e6, "gpt2-medium"), (700e6, "gpt2-medium"), (850e6, "gpt2-large"),
                               (2e9, "gpt2-xl")):
            fit = memory.largest_fitting(memory.RUNTIME[method] + tokenizer + per_param * params, GPT2, 1, 1,
                                         method=method)
            assert (fit and fit[0]) == picked


@pytest.mark.parametrize("how", [{"method": "bp"}, {"method": "bp", "checkpoint_fraction": 1.0},
                                 {"method": "ort-mezo"}, {"method": "torch-mezo", "dtype": "float16"}])
def test_budget_inversion_is_monotone(how):
    for sizes in memory.SIZES.values():
        picked = [memory.largest_fitting(int(g * 1e9), sizes, 16, 256, **how) for g in (1, 2, 4, 8, 17, 40, 80, 200)]
        params = [0 if p is None else p[1].params for p in picked]
        assert params == sorted(params)
        assert all(p is None or p[1].total <= g * 1e9 for p, g in zip(picked, (1, 2, 4, 8, 17, 40, 80, 200)))


def test_paper_setting_at_17_gb():
    """BP fits GPT-2-medium and not GPT-2-large; MeZO on 16-bit weights fits Llama-2-7B, ~19x
    the parameters; Llama-2-13B does not fit with 16-bit weights."""
    p, budget = memory.PAPER, memory.parse_size("17GB")
    bp = dict(method="bp", optimizer=p.bp_optimizer, dtype=p.bp_dtype)
    assert memory.largest_fitting(budget, GPT2, p.batch, p.seq, **bp)[0] == p.bp_model == "gpt2-medium"
    fit = memory.largest_fitting(budget, memory.SIZES["llama2"], p.batch, p.seq, method="torch-mezo",
                                 dtype=p.mezo_dtype)
    assert fit[0] == "llama2-7b"


def test_more_memory_for_more_of_anything():
    cfg = memory.alias_config("smollm2-135m")
    base = {m: memory.estimate(cfg, 8, 64, method=m).total for m in memory.METHODS}
    assert base["ort-mezo"] < base["torch-mezo"] < base["bp"]
    for m in memory.METHODS:  # torch-mezo's peak may be its update's temporaries, which no batch changes
        assert memory.estimate(cfg, 16, 128, method=m).total >= base[m] + (m != "torch-mezo")
    adamw, momentum, sgd = (memory.estimate(cfg, 8, 64, method="bp", optimizer=o) for o in ("adamw", "momentum", "sgd"))
    assert adamw.terms["optimizer state"] == 2 * momentum.terms["optimizer state"] == 2 * adamw.terms["weights"]
    assert sgd.terms["optimizer state"] == 0
    assert sgd.total < momentum.total < adamw.total


def _expect_error(capsys, argv, message):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("ortzo: error: ") and message in err, err


def test_cli_errors_are_one_line(capsys, tmp_path):
    _expect_error(capsys, ["memory", "--budget", "17 gigs"], "bad memory size '17 gigs'")
    _expect_error(capsys, ["memory", "no-such-model"], "unknown model 'no-such-model'")
    _expect_error(capsys, ["memory", str(tmp_path)], "holds no hf_config.json or config.json")
    _expect_error(capsys, ["memory"], "give a MODEL, --budget or --validate")
    _expect_error(capsys, ["memory", "gpt2", "--checkpoint-fraction", "2"], "--checkpoint-fraction")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    _expect_error(capsys, ["memory", str(tmp_path)], "unsupported model_type 'bert'")
    (tmp_path / "config.json").write_text("{not json")
    _expect_error(capsys, ["memory", str(tmp_path / "config.json")], "bad config file")
    _expect_error(capsys, ["memory", "gpt2", "--base", "int4", "--engine", "torch-bp"], "--base is ort-mezo's")
    _expect_error(capsys, ["memory", "gpt2", "--lora-rank", "8", "--engine", "ort"],
                  "LoRA is estimated over a frozen base")


def test_cli_prints_terms_and_the_budget(capsys, tmp_path):
    config, _ = _model("llama")
    (tmp_path / "hf_config.json").write_text(config.to_json_string())  # a trainable folder's
    assert main(["memory", str(tmp_path), "--engine", "torch-bp", "--checkpoint-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "activations kept" in out and "layer 0" in out and "(checkpointed: its input)" in out
    assert main(["memory", "gpt2-xl", "--budget", "10GiB"]) == 0
    fits = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("fits 10GiB")).split()
    assert fits[2:] == ["yes", "yes", "no"]  # ort-mezo, torch-mezo, bp
    assert main(["memory", "--budget", "17GB"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-medium" in out and "llama2-7b" in out and "paper" in out and "ort-mezo, int4 base" in out


def test_a_frozen_base_costs_its_quantized_bytes_by_hand():
    """SmolLM2-135M's int4 base, worked by hand: 30 layers of 7 matrices in blocks of 32 along
    their input, 0.5 byte a weight, a 4-byte scale and a 4-byte zero point a block; the tied
    49152 x 576 table at int8 (a byte a weight, a 4-byte scale a block of 32) and its bytes
    once more for the head; 30 x 2 + 1 norms of 576, fp32, twice."""
    a = memory.Arch.from_config(memory.alias_config("smollm2-135m"))
    h, i, kv = 576, 1536, 192
    matrices = 30 * (h * h + 2 * h * kv + h * h + 3 * h * i)
    terms = memory.frozen_base_bytes(a, 4, 32)
    assert terms["quantized matrices"] == matrices // 2 + matrices // 32 * 8
    table = 49152 * h
    assert terms["embedding and head"] == table + table // 32 * 4 + table
    assert terms["trained vectors (x2)"] == 2 * 4 * (61 * h)
    lora = memory.frozen_base_bytes(a, 4, 32, lora_rank=8)["LoRA (x2)"]
    assert lora == 2 * 4 * 30 * 8 * ((h + h) + (h + kv))  # q: 576 -> 576, v: 576 -> 192
    # what ORT holds of it at a step (test_a_frozen_base_holds_what_ort_keeps_by_hand), not the file
    e = memory.estimate(memory.alias_config("smollm2-135m"), 16, 96, base="int4", padded=False)
    plain = memory.estimate(memory.alias_config("smollm2-135m"), 16, 96, padded=False)
    resident = memory.frozen_base_resident(a, 4, 32)
    assert e.total - plain.total == sum(resident.values()) - 4 * memory.parameter_count(a) + 4 * h * i


def test_ort_forward_is_its_first_run_and_its_memory_pattern_by_hand():
    """SmolLM2-135M at 16 x 128, fp32, worked by hand: t = 2048 tokens, h 576, I 1536, 9
    heads of 64. At the attention's NaN guard ORT's plan holds the layer's input and normed
    input, the softmax, its NaN mask and the guard's output, the batch's boolean mask and the
    rotary tables; Where adds its two selections as scratch. In the MLP: the residual and
    act, up and their product. The first run's arena peaks at the guard (planned + scratch),
    the memory pattern is the MLP's planned tensors, and both stay resident."""
    config = memory.alias_config("smollm2-135m")
    a = memory.Arch.from_config(config)
    b, s, t, c = 16, 128, 16 * 128, 4
    scores, rotary, mask = b * 9 * s * s, 2 * c * t * 64, b * s * s
    attention = 2 * c * t * 576 + (2 * c + 1) * scores + mask + rotary
    mlp = c * t * 576 + 3 * c * t * 1536 + mask + rotary
    assert memory.ort_phases(a, b, s, c) == {"attention": (attention, 2 * c * scores), "mlp": (mlp, 0)}
    assert attention < mlp < attention + 2 * c * scores
    first, pattern = attention + 2 * c * scores, mlp
    assert memory.ort_arena(a, b, s, c) == (first, pattern)
    assert memory.forward_transient(a, b, s, c, padded=True, ort=True) == first + pattern
    for padded in (True, False):  # the graph computes the mask and GQA's expansion either way
        e = memory.estimate(config, b, s, padded=padded)
        assert e.terms["forward transient"] == first + pattern and e.phase == "forward"
        assert e.terms["scoring head"] == 2 * 4 * b * 49152 + pattern
        assert e.total == memory.RUNTIME["ort-mezo"] + memory.TOKENIZER * 49152 + 4 * e.params + first + pattern
    assert (first + pattern) / 2**20 == 90.25  # peak RSS grew by 104.9 MiB: the allocator's placement (ort_arena)


def test_ort_head_and_activations_by_family():
    """Gemma 3 270M at 4 x 32: its head's logits and log-probs (2 x 4 b V over 262,144 ids) are
    more than a layer's tensors, so the memory pattern is the head's; its tanh GELU, composed,
    holds four I-wide tensors (ORT fuses SiLU, not it), and its sliding and full layers each
    have a boolean mask. Phi-3 splits its fused gate_up (four), Phi and Cohere hold the
    attention's output beside the MLP, GPT-2's MLP two."""
    config = memory.alias_config("gemma3-270m")
    a = memory.Arch.from_config(config)
    b, s, t, c = 4, 32, 128, 4
    planned, _ = memory.ort_phases(a, b, s, c)["mlp"]
    assert planned == c * t * 640 + 4 * c * t * 2048 + 2 * b * s * s + 2 * 2 * c * t * 256
    head = 2 * 4 * b * 262144
    e = memory.estimate(config, b, s, padded=False)
    first = max(p + x for p, x in memory.ort_phases(a, b, s, c).values())
    assert head > first and memory.ort_arena(a, b, s, c, head) == (head, head)
    assert e.phase == "head" and e.terms["scoring head"] == 2 * head and e.terms["forward transient"] == first + head
    for name, wide, held in (("phi3", 4, 1), ("phi", 2, 2), ("cohere", 3, 2), ("gpt2", 2, 1), ("opt", 2, 1),
                             ("llama", 3, 1)):
        family, kw = TINY[name]
        x = memory.Arch.from_config({"model_type": family} | kw)
        rotary = memory.outer_activations(x, 2, 8, 4, False)["rotary tables"]
        masks = 4 * 2 * 64 if family == "opt" else 2 * 64  # OPT's one float mask
        mlp = held * 4 * 16 * x.hidden + wide * 4 * 16 * x.intermediate + masks + rotary
        assert memory.ort_phases(x, 2, 8, 4)["mlp"][0] == mlp, name


def test_a_frozen_base_holds_what_ort_keeps_by_hand():
    """SmolLM2-135M's bases as ORT 1.32 keeps them (measured: the arena after session
    creation and the mapped file's resident pages, see frozen_base_resident). Matrices
    (106.2M weights in blocks of 32): int4 with float zero points is never packed, so its
    stored bytes stay mapped; int8 is packed at level 4 (a byte a weight, an fp32 scale and
    block sum a block) and keeps its mapped scales and zero points; int4 symmetric packs to
    half a byte and 8 bytes a block (level 4) or half a byte alone (level 0); 8 bits below
    level 4 are not packed, and each call dequantizes B into fp32. The tied 49152 x 576 table
    stays mapped with its scales; the head is its second layout, packed like an int8 matrix
    (or, below level 4, mapped: its scales are the table's); kept fp32 the table is read by a
    Gemm whose packed B is a second copy."""
    a = memory.Arch.from_config(memory.alias_config("smollm2-135m"))
    h, i, kv, v = 576, 1536, 192, 49152
    m = 30 * (h * h + 2 * h * kv + h * h + 3 * h * i)
    table, vectors = v * h, 2 * 4 * 61 * h
    mapped_table = table + table // 32 * 4
    head_packed = table + table // 32 * 8
    assert memory.frozen_base_resident(a, 4, 32) == {
        "quantized matrices (mapped)": m // 2 + m // 32 * 8, "embedding tables (mapped)": mapped_table,
        "head": head_packed, "trained vectors (x2)": vectors}
    assert memory.frozen_base_resident(a, 8, 32) == {
        "packed matrices": m + m // 32 * 8, "scales, zero points (mapped)": m // 32 * 5,
        "embedding tables (mapped)": mapped_table, "head": head_packed, "trained vectors (x2)": vectors}
    sym = memory.frozen_base_resident(a, 4, 32, symmetric=True)
    assert (sym["packed matrices"], sym["scales, zero points (mapped)"]) == (m // 2 + m // 32 * 8, m // 32 * 4)
    sym0 = memory.frozen_base_resident(a, 4, 32, symmetric=True, accuracy_level=0)
    assert (sym0["packed matrices"], sym0["head"]) == (m // 2, table)
    level0 = memory.frozen_base_resident(a, 8, 32, accuracy_level=0)
    assert (level0["quantized matrices (mapped)"], level0["head"]) == (m + m // 32 * 5, table)
    assert memory.frozen_base_scratch(a, 16, 128, 8, accuracy_level=0) == {"forward": 4 * h * i, "head": 4 * table}
    assert memory.frozen_base_scratch(a, 16, 128, 4) == {"forward": 4 * h * i, "head": 16 * (h // 32) * 40}
    assert memory.frozen_base_scratch(a, 16, 128, 8)["forward"] == 2048 * (i // 32) * 40  # down_proj's A, quantized
    stored = memory.frozen_base_resident(a, 4, 32, embedding=0)
    assert (stored["embedding tables (mapped)"], stored["head"]) == (4 * table, 4 * table)
    e = memory.estimate(memory.alias_config("smollm2-135m"), 16, 128, base="int8", padded=False)
    first, pattern = memory.ort_arena(a, 16, 128, 4, 2 * 4 * 16 * v)
    held = memory.RUNTIME["ort-mezo"] + memory.TOKENIZER * v + sum(memory.frozen_base_resident(a, 8).values())
    assert e.total == held + first + pattern + 2048 * (i // 32) * 40


def test_ort_arena_follows_the_profiler(tiny_model, tmp_path):
    """ONNX Runtime's own bookkeeping of its arena (the profiler's per-node memory stats, no
    timing) on the tiny Llama at 16 x 128: the first run's requested bytes peak at the planned
    tensors `ort_phases` counts (measured +1 %), its in-use peak adds Where's scratch (+4 %),
    and the second run holds the memory pattern's block from its start: the planned peak and
    the holes of its best-fit offsets (+10 %)."""
    import json
    from pathlib import Path

    import numpy as np

    from ortzo.model.manifest import Manifest
    from ortzo.model.session import ScoringSession
    from ortzo.model.targets import load_target
    from ortzo.model.weights import WeightStore

    target = load_target("cpu")
    options = target.session_options

    class Profiled:
        def __getattr__(self, name):
            return getattr(target, name)

        def session_options(self):
            so = options()
            so.enable_profiling = True
            so.profile_file_prefix = str(tmp_path / "arena")
            return so

    store = WeightStore.load(tiny_model, Manifest.load(tiny_model))
    session = ScoringSession(tiny_model, store, Profiled())
    b, s = 16, 128
    ids = np.random.default_rng(0).integers(10, 512, (b, s))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(s), (b, 1)),
             "score_index": np.arange(b) * s + s - 1, "score_ids": np.tile([11, 12], (b, 1))}
    session(feeds)
    session(feeds)
    events = json.loads(Path(session.session.end_profiling()).read_text())
    nodes = [e["args"] for e in events if e.get("cat") == "Node"]
    if not nodes or "mem_bytes_requested_in_use" not in nodes[0]:
        pytest.skip("this onnxruntime's profiler records no arena statistics")
    first_run, second_run = nodes[:len(nodes) // 2], nodes[len(nodes) // 2:]  # the same nodes twice
    requested = max(int(n["mem_bytes_requested_in_use"]) for n in first_run)
    peak = max(int(n["mem_in_use_peak"]) for n in first_run)
    block = int(second_run[0]["mem_bytes_requested_in_use"]) - int(second_run[0]["mem_requested_in_use_delta"])
    a = memory.Arch.from_config(json.loads((tiny_model / "hf_config.json").read_text()))
    phases = memory.ort_phases(a, b, s, 4)
    planned = max(p for p, _ in phases.values())
    first, pattern = memory.ort_arena(a, b, s, 4)
    assert requested == pytest.approx(planned, rel=0.05)
    assert peak == pytest.approx(first, rel=0.1)
    assert pattern <= block <= 1.25 * pattern


def _allocation_peak(fn) -> int:
    """The most bytes allocated at once while `fn` runs, above what was allocated before:
    the profiler's memory timeline (a private API of the pinned torch)."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        fn()
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline(torch.device("cpu"))
    live = np.array(sizes).sum(axis=1)
    return int(live.max() - live[0])


def _bp_step_peak(model, optimizer, feeds, labels) -> int:
    """The allocation peak of a backprop step as the torch-bp engine takes it (gradients set
    to None after the step), measured after a first step has made the optimizer's state."""
    from ortzo.engines.torch_model import candidate_loss, scores

    def step():
        candidate_loss(scores(model, feeds), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return _allocation_peak(step)


MID = {"llama": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4),
       "gpt2": dict(n_embd=256, n_head=8, n_positions=128),
       # a narrow MLP: Phi's peak is its attention's (GPT-2 checks the composed gelu_new's)
       "phi": dict(hidden_size=256, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4),
       "gemma2": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=32, sliding_window=32),
       "cohere": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4)}


def _mid_model(family: str):
    return _build(family, 2, vocab_size=8000, **MID[family])


def _feeds(b: int, s: int):
    import numpy as np

    mask = np.ones((b, s), np.int64)
    mask[0, :5] = 0
    return {"input_ids": np.random.default_rng(0).integers(2, 8000, (b, s)), "attention_mask": mask,
            "position_ids": np.maximum(mask.cumsum(1) - 1, 0), "score_index": np.arange(b) * s + s - 1,
            "score_ids": np.tile([3, 4], (b, 1))}


@pytest.mark.parametrize("family, fraction", [("llama", 1), ("gpt2", 0)])
def test_bp_peak_matches_the_allocator(family, fraction):
    """A backprop step as the torch-bp engine takes it (AdamW, gradients set to None after the
    step), after a first step has made the optimizer's state: its allocation peak above the
    weights and that state, within 6 % (the backward's working set is a calibrated 2 c t I)."""
    import numpy as np
    import torch

    from ortzo.engines.torch_model import checkpoint_layers

    config, model = _mid_model(family)
    checkpoint_layers(model.train(), fraction)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    measured = _bp_step_peak(model, optimizer, _feeds(8, 64), np.zeros(8, np.int64))
    e = memory.estimate(config.to_dict(), 8, 64, method="bp", checkpoint_fraction=fraction)
    held = ("runtime", "tokenizer", "weights", "optimizer state")
    assert e.total - sum(e.terms[k] for k in held) == pytest.approx(measured, rel=0.06)


def test_tied_embedding_peak_is_the_end_of_backward():
    """With plain SGD and a tied embedding much larger than the rest, the peak is where the
    Gather's dense gradient meets the head's: above the weights, all gradients plus two more
    V x e (the Gather's and the sum), within 3 %. An untied model's peak has no such term."""
    import numpy as np
    import torch

    small = dict(vocab_size=64000, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    feeds, labels = _feeds(2, 8), np.zeros(2, np.int64)
    feeds["input_ids"] = np.random.default_rng(0).integers(2, 64000, (2, 8))
    for tied in (True, False):
        config, model = _build("llama", 2, tie_word_embeddings=tied, **small)
        optimizer = torch.optim.SGD(model.train().parameters(), lr=1e-6)
        measured = _bp_step_peak(model, optimizer, feeds, labels)
        params = 4 * sum(p.numel() for p in model.parameters())
        expected = params + (2 * 4 * 64000 * 64 if tied else 0)  # computed here, not by the model
        e = memory.estimate(config.to_dict(), 2, 8, method="bp", optimizer="sgd")
        assert measured == pytest.approx(expected, rel=0.03)
        assert e.phase == "backward end"
        assert e.total - sum(e.terms[k] for k in ("runtime", "tokenizer", "weights")) == pytest.approx(measured, rel=0.03)


@pytest.mark.parametrize("family", MID)
def test_inference_forward_matches_the_allocator(family):
    """torch-mezo's forward (inference mode): its allocation peak above the weights is the
    forward transient (the head comes after it), within 3 %."""
    import numpy as np
    import torch

    from ortzo.engines.torch_model import candidate_loss, scores

    config, model = _mid_model(family)
    model.eval()
    feeds = _feeds(8, 64)

    def forward():
        with torch.inference_mode():
            candidate_loss(scores(model, feeds), np.zeros(8, np.int64))

    forward()
    e = memory.estimate(config.to_dict(), 8, 64, method="torch-mezo")
    assert e.terms["forward transient"] == pytest.approx(_allocation_peak(forward), rel=0.03)
