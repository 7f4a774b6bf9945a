"""A trainable folder's weights as a standard ONNX model that plain onnxruntime loads.

A folder `ortzo export` made becomes what Optimum's `ORTModelForCausalLM.from_pretrained(out)`
and onnxruntime-genai's `og.Model(out)` load as they are and generate with, reusing its KV cache:

    model.onnx              the causal LM with its KV cache (model/cached.py), every weight an initializer
    model.onnx_data         the weights (Linear weights [in, out] where the graph reads them so)
    config.json             the model's Hugging Face config (without it Optimum re-exports)
    generation_config.json  its start, end and padding tokens
    genai_config.json       what onnxruntime-genai's og.Model(out) needs to generate with the same
                            graph and cache (a generic decoder: the graph computes the family's details)
    tokenizer.json          the folder's tokenizer, adding the start token exactly when ortzo
    tokenizer_config.json   does; with the special tokens AutoTokenizer needs

The KV-cache graph is traced again with Optimum, so it needs the export extra; without it, and
for a frozen base (its matrices quantized constants of the folder's own graph), model.onnx is
the folder's full-logits graph (model.logits) without a cache, which Optimum loads with
`use_cache=False`, and a note says so.

A folder `ortzo prepare` made (someone else's ONNX model) becomes that model again: its own
graph with the folder's weights as initializers (model.onnx, model.onnx_data) and its
tokenizer.json if it has one; a frozen base stays as the folder holds it (quantized, with
its LoRA branches).

The weights always go to the external data file (model/external.py), whatever the model's
size: one code path for every model (a size threshold would leave that path untested by small
models), laid out as Optimum expects (`<file>_data`). The model is built beside `out` and renamed into
place; nothing it reads is changed. Which weights (a folder's, a run's at some step) is the
recipe's business (recipes/bake.py).
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..extras import MissingExtra, require
from ..files import TMP_SUFFIX, atomic_open, check_output_folder, fsync_dir, write_json
from .cached import cached_graph
from .external import DataFile
from .logits import logits_graph
from .manifest import Manifest, hf_config
from .weights import WeightStore

if TYPE_CHECKING:
    import onnx
    from tokenizers import Tokenizer

MODEL = "model.onnx"
DATA = "model.onnx_data"
TOKENIZER = "tokenizer.json"
GENAI_CONFIG = "genai_config.json"
PREPARED = "onnx"  # the source kind of a folder `ortzo prepare` made (model/prepare.py)


def write_baked(folder: Path, store: WeightStore, out: Path, force: bool = False,
                reads: tuple[Path, ...] = (), say: Callable[[str], None] = print) -> None:
    """Bake `store` (weights of the trainable folder `folder`) into the model folder `out`;
    `reads`: more paths `out` must not replace."""
    check_output_folder(out, force, {folder, *reads}, MODEL)
    manifest = store.manifest
    config = None if manifest.source.get("kind") == PREPARED else hf_config(folder)
    if config is None:  # someone else's model: its own graph
        graph, reads_transposed = _load_graph(folder / manifest.graph), None
    else:
        graph, reads_transposed = _causal_lm(folder, manifest, config, say)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.", suffix=TMP_SUFFIX) as tmp:
        build = Path(tmp) / "baked"
        build.mkdir()
        _write_model(graph, store, folder, build, reads_transposed)
        if config is not None:
            generation = _generation(config, manifest.tokenizer)
            write_json(build / "config.json", config)
            write_json(build / "generation_config.json", generation)
            if reads_transposed is not None:  # the KV-cache graph
                write_json(build / GENAI_CONFIG, _genai_config(graph, config, generation))
        if manifest.tokenizer and config is not None:
            _write_tokenizer(folder, manifest.tokenizer, config, build)
        elif manifest.tokenizer:
            shutil.copyfile(folder / manifest.tokenizer.get("file", TOKENIZER), build / TOKENIZER)
        else:
            say(f"note: {folder} has no tokenizer; the baked model has none either")
        if out.exists():
            shutil.rmtree(out)
        build.rename(out)
    fsync_dir(out.parent)


def _load_graph(path: Path) -> onnx.ModelProto:
    """A folder's graph, its frozen base's data left where it is (read one tensor at a time)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _causal_lm(folder: Path, manifest: Manifest, config: dict[str, Any],
               say: Callable[[str], None]) -> tuple[onnx.ModelProto, set[str] | None]:
    """The exported folder's causal LM with its KV cache and the weights it reads [in, out]
    (model/cached.py), or, where that cannot be had, its full-logits graph (None: it reads
    the folder's layout) and a note saying why."""
    if manifest.base:
        say(f"note: {folder} has a frozen base; the baked model keeps it, without a KV cache: "
            "load it with ORTModelForCausalLM.from_pretrained(out, use_cache=False)")
        return logits_graph(folder), None
    try:
        require("export", "a KV cache")
    except MissingExtra as e:
        say(f"note: no KV cache without the export extra ({e.module} is missing): load the baked model with "
            "ORTModelForCausalLM.from_pretrained(out, use_cache=False), or pip install 'ortzo[export]' and bake again")
        return logits_graph(folder), None
    return cached_graph(folder, manifest, config)


def _write_model(graph: onnx.ModelProto, store: WeightStore, folder: Path, out: Path,
                 reads_transposed: set[str] | None = None) -> None:
    """The graph with each weight input made an initializer whose data lies in DATA, in the
    layout the graph reads (the folder's, or [in, out] exactly for `reads_transposed`; a
    PyTorch engine's store is flipped back on the way out). A frozen base's constants are
    copied into DATA one at a time; its trainable tensors' starting values give way to the
    store's."""
    from onnx import TensorProto, numpy_helper

    g = graph.graph
    inputs = [i for i in g.input if i.name not in store.arrays]
    del g.input[:]
    g.input.extend(inputs)
    constants = [t for t in g.initializer if t.name not in store.arrays]
    del g.initializer[:]
    with atomic_open(out / DATA, "wb") as f:
        data = DataFile(f, DATA)
        for t in constants:
            external = t.data_location == TensorProto.EXTERNAL
            g.initializer.append(data.add(t.name, numpy_helper.to_array(t, str(folder))) if external else t)
        for p in store.manifest.parameters:
            a = store.arrays[p.name]
            a = a.T if p.name in store.flipped else a  # the folder's layout
            if reads_transposed is not None and (p.name in reads_transposed) != p.transposed:
                a = a.T
            g.initializer.append(data.add(p.name, a))
    with atomic_open(out / MODEL, "wb") as f:
        f.write(graph.SerializeToString())


def _generation(config: dict[str, Any], tokenizer: dict[str, Any]) -> dict[str, Any]:
    """Start, end and padding tokens for generate(); padding as ortzo pads (the end token
    where the model has no padding token), so generate() need not guess."""
    pad = config.get("pad_token_id")
    ids = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
           "pad_token_id": pad if pad is not None else tokenizer.get("pad_id")}
    return {k: v for k, v in ids.items() if v is not None}


def _plain_byte_level_decoder(tok: Tokenizer) -> None:
    """Give a byte-level BPE the plain ByteLevel decoder where transformers' GGUF conversion
    wrote SentencePiece's steps before it (ByteFallback, Fuse, Replace "\u2581"): ort-extensions,
    which tokenizes for onnxruntime-genai, reads ByteFallback as a SentencePiece model and then
    encodes each space as three unknown tokens. Decoding is unchanged: those steps act only on
    <0xNN> tokens and on "\u2581", which such a vocabulary has not (checked)."""
    from tokenizers import decoders

    spec = json.loads(tok.to_str())
    steps = (spec.get("decoder") or {}).get("decoders") or []
    sentencepiece = [{"type": "ByteFallback"}, {"type": "Fuse"},
                     {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}]
    if not (steps and steps[-1]["type"] == "ByteLevel" and all(step in sentencepiece for step in steps[:-1])
            and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))):
        return
    if any(re.fullmatch(r"<0x[0-9A-F]{2}>", t) or "\u2581" in t for t in tok.get_vocab()):
        return
    tok.decoder = decoders.ByteLevel()


def _genai_config(graph: onnx.ModelProto, config: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime-genai's description of the KV-cache graph. Layers, heads and head size come
    from the graph's past inputs ([batch, kv heads, past, head size]) and the vocabulary from its
    logits, which every family exports alike (config keys differ between families). The type is
    og's generic "decoder" (the graph computes the family's details), and the cache grows token
    by token instead of one buffer sized to the whole context."""
    inputs = {i.name: i.type.tensor_type.shape.dim for i in graph.graph.input}
    logits = next(o.type.tensor_type.shape.dim for o in graph.graph.output if o.name == "logits")
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    heads, head_size = inputs["past_key_values.0.key"][1].dim_value, inputs["past_key_values.0.key"][3].dim_value
    context = next((config[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if isinstance(config.get(k), int)), 2048)  # og needs one; 2048 where the config names none
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask",  # position_ids: og feeds them if read
             "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    decoder = {"filename": MODEL, "num_hidden_layers": layers, "num_key_value_heads": heads, "head_size": head_size,
               "num_attention_heads": config.get("num_attention_heads", heads),
               "hidden_size": config.get("hidden_size", heads * head_size),
               "session_options": {"provider_options": []}, "inputs": names,
               "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                           "present_value_names": "present.%d.value"}}
    return {"model": {"type": "decoder", "context_length": context, "vocab_size": logits[2].dim_value,
                      **generation, "decoder": decoder},
            "search": {"do_sample": False, "num_beams": 1, "max_length": context, "past_present_share_buffer": False}}


def _write_tokenizer(folder: Path, info: dict[str, Any], config: dict[str, Any], out: Path) -> None:
    """tokenizer.json, encoding as ortzo's tokenizer does (the start token iff the manifest
    says so: a tokenizer read from GGUF may add one the model never saw), and the
    tokenizer_config.json that makes AutoTokenizer load it as a plain fast tokenizer, padding
    a batch on the left for generate()."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(folder / info.get("file", "tokenizer.json")))
    bos = info.get("bos_id") if info.get("add_bos") else None
    if tok.encode("a").ids != ([bos] if bos is not None else []) + tok.encode("a", add_special_tokens=False).ids:
        start = tok.id_to_token(bos) if bos is not None else None
        tok.post_processor = None if start is None else processors.TemplateProcessing(
            single=f"{start} $A", special_tokens=[(start, bos)])
    _plain_byte_level_decoder(tok)
    with atomic_open(out / "tokenizer.json", "w") as f:
        f.write(tok.to_str())
    eos = config.get("eos_token_id")
    ids = {"bos_token": info.get("bos_id", config.get("bos_token_id")),
           "eos_token": eos[0] if isinstance(eos, list) else eos, "pad_token": info.get("pad_id"),
           "unk_token": config.get("unk_token_id")}
    names = {k: tok.id_to_token(int(i)) for k, i in ids.items() if i is not None}
    write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                               "model_input_names": ["input_ids", "attention_mask"],
                                               "clean_up_tokenization_spaces": False,
                                               "padding_side": info.get("padding_side", "left"),  # as ortzo pads
                                               **{k: v for k, v in names.items() if v is not None}})
