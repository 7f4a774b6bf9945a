"""The export pass: a Hugging Face causal LM -> a trainable model folder.

Optimum exports the model (text-generation, no KV cache). This pass then
- gives every weight its PyTorch name (Optimum names transposed Linear weights
  `onnx::MatMul_NNN`; the MatMul node's scope names the module) and keeps tied weights one input,
- moves the weights out of the graph into named graph inputs and one aligned flat file,
  streaming one tensor at a time, so there is no 2 GB protobuf limit and memory stays low,
- replaces the full-vocabulary logits with a scoring head: log-probabilities of candidate ids
  at chosen rows only (`score_index` into the flattened [B*S] positions, `score_ids` [N, K]).

Needs the `export` extra (torch, optimum-onnx, transformers); the runtime never imports this.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OrtzoError
from .files import atomic_open
from .manifest import Manifest, Parameter, aligned

WEIGHTS = "weights.bin"
GRAPH = "model.onnx"
TOKENIZER = "tokenizer.json"
DATA_INPUTS = ("input_ids", "attention_mask", "position_ids", "score_index", "score_ids")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Source:
    """Where a model comes from: a hub id, a local HF folder, or a GGUF file."""

    kind: str  # "hub" | "dir" | "gguf"
    location: str
    alias: str | None = None


def known_models() -> list[str]:
    return sorted(p.name[:-5] for p in files("ortzo.model_files").iterdir() if p.name.endswith(".toml"))


def resolve(model: str) -> Source:
    """An alias from export/*.toml, a .gguf path, a local folder, or else a hub id."""
    spec = files("ortzo.model_files") / f"{model}.toml"
    if spec.is_file():
        d = tomllib.loads(spec.read_text(encoding="utf-8"))["source"]
        if d["kind"] == "hub":
            return Source("hub", d["id"], model)
        if d["kind"] == "package-gguf":
            return Source("gguf", str(_packaged_gguf(d)), model)
        raise OrtzoError(f"export/{model}.toml: unknown source kind {d['kind']!r}")
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise OrtzoError(f"GGUF file not found: {path}")
        return Source("gguf", str(path))
    if path.is_dir():
        return Source("dir", str(path))
    if path.exists() or not _HUB_ID.match(model):
        raise OrtzoError(f"unknown model {model!r}: not an alias ({', '.join(known_models())}), "
                         "a .gguf file, a local folder or a hub id (owner/name)")
    return Source("hub", model)


def _packaged_gguf(d: dict[str, Any]) -> Path:
    spec = importlib.util.find_spec(d["module"])
    if spec is None or not spec.submodule_search_locations:
        raise OrtzoError(f"package {d['package']} is not installed: {d['install']}")
    folder = Path(spec.submodule_search_locations[0])
    if "assemble" in d:  # chunked packages write the file on first use
        target = Path(tempfile.gettempdir()) / "ortzo-gguf" / d["file"]
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            mod = importlib.import_module(d["module"])
            getattr(mod, d["assemble"])(str(target))
        return target
    path = folder / d["file"]
    if not path.is_file():
        raise OrtzoError(f"{d['package']} does not hold {d['file']}")
    return path


def export_model(model: str, out: str | Path, opset: int = 17, force: bool = False, dtype: str = "float32") -> Manifest:
    """Export `model` into the trainable folder `out`, atomically (built beside it, then renamed)."""
    out = Path(out)
    if dtype not in ("float32", "float16"):
        raise OrtzoError(f"unsupported dtype {dtype!r}; choose float32 or float16")
    if out.exists() and any(out.iterdir()) and not force:
        raise OrtzoError(f"{out} exists and is not empty; pass --force to replace it")
    source = resolve(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        hf_dir = _hf_folder(source, tmp / "hf")
        _optimum_export(hf_dir, tmp / "onnx", opset)
        build = tmp / "trainable"
        build.mkdir()
        tok = export_tokenizer(source, hf_dir, build)
        manifest = convert(tmp / "onnx" / GRAPH, hf_dir, build, tok,
                           source={"model": model, "kind": source.kind, "location": source.location}, dtype=dtype)
        if out.exists():
            shutil.rmtree(out)
        build.rename(out)
    return manifest


def _hf_folder(source: Source, work: Path) -> Path:
    """A local HF folder with safetensors: GGUF files are dequantized to fp32 first."""
    if source.kind == "dir":
        return Path(source.location)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if source.kind == "gguf":
            gguf = Path(source.location)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32)
            AutoTokenizer.from_pretrained(source.location).save_pretrained(work)
    except OSError as e:
        raise OrtzoError(f"cannot load {source.location}: {str(e).splitlines()[0]}") from None
    model.save_pretrained(work)
    return work


def _optimum_export(hf_dir: Path, out: Path, opset: int) -> None:
    from optimum.exporters.onnx import main_export

    main_export(str(hf_dir), output=str(out), task="text-generation", opset=opset, device="cpu",
                custom_onnx_configs=_with_position_ids(hf_dir))
    if not (out / GRAPH).is_file():
        raise OrtzoError(f"Optimum wrote no {GRAPH} for {hf_dir}")


def _with_position_ids(hf_dir: Path) -> dict[str, Any] | None:
    """Optimum's config for the architecture, with a `position_ids` input if it lacks one.

    Left-padded batches need explicit positions; Optimum's Gemma 3 config, for one, has none and
    the graph would number padded rows from their padding."""
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    ctor = TasksManager.get_exporter_config_constructor("onnx", task="text-generation", model_type=config.model_type,
                                                        library_name="transformers")
    onnx_config = ctor(config, task="text-generation")
    if "position_ids" in onnx_config.inputs:
        return None

    class WithPositionIds(type(onnx_config)):
        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            return super().inputs | {"position_ids": {0: "batch_size", 1: "sequence_length"}}

    return {"model": WithPositionIds(config, task="text-generation", use_past=False, use_past_in_inputs=False)}


def export_tokenizer(source: Source, hf_dir: Path, out: Path) -> dict[str, Any]:
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


def _pytorch_params(hf_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    if not shapes:
        raise OrtzoError(f"{hf_dir} has no .safetensors weights")
    return shapes


def convert(onnx_path: Path, hf_dir: Path, out: Path, tokenizer: dict[str, Any],
            source: dict[str, Any], dtype: str = "float32") -> Manifest:
    """The ortzo pass over an Optimum export. Writes model.onnx, weights.bin, manifest.json.

    dtype "float16" stores the weights in fp16 (half the file); the graph casts each to fp32
    where it is used, so compute stays fp32 on every provider (on CPU the casts cost more
    memory than fp16 saves: the README has the figures)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import load_external_data_for_model
    from transformers import AutoConfig

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    shapes = _pytorch_params(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)  # defaults included: tie_word_embeddings is often implicit
    tied = {"lm_head.weight": _embedding_name(g)} if config.tie_word_embeddings else {}

    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    names = {}  # initializer name -> (pytorch name, transposed)
    for init in g.initializer:
        name = _pytorch_name(init, consumers, shapes, tied)
        if name is not None:
            names[init.name] = name

    params: list[Parameter] = []
    rename: dict[str, str] = {}
    keep = []
    offset = 0
    h = hashlib.sha256()
    base = str(onnx_path.parent)
    originals: dict[str, Any] = {}
    with atomic_open(out / WEIGHTS, "wb") as f:
        for init in g.initializer:
            if init.name not in names:
                keep.append(init)
                continue
            pt_name, transposed = names[init.name]
            if pt_name in tied:  # a second copy of a tied weight: point it at the first
                rename[init.name] = _retie(g, init, originals.get(tied[pt_name]), base)
                continue
            arr = numpy_helper.to_array(init, base).astype(dtype, copy=False)
            start = aligned(offset)
            pad = b"\0" * (start - offset)
            f.write(pad)
            h.update(pad)
            data = memoryview(np.ascontiguousarray(arr)).cast("B")
            f.write(data)
            h.update(data)
            offset = start + arr.nbytes
            params.append(Parameter(pt_name, tuple(arr.shape), dtype, start, transposed))
            rename[init.name] = pt_name
            originals[pt_name] = init
            del arr, data
    del g.initializer[:]
    g.initializer.extend(keep)
    # What remains external is small (graph constants, Constant nodes): pull it into the graph.
    load_external_data_for_model(model, base)
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for p in params:
        g.input.append(helper.make_tensor_value_info(p.name, onnx.TensorProto.FLOAT, list(p.shape)))
    _add_scoring_head(g)
    _prune(g)
    if dtype == "float16":
        _cast_weights(g, [p.name for p in params])
    onnx.checker.check_model(model)
    with atomic_open(out / GRAPH, "wb") as fo:
        fo.write(model.SerializeToString())
    inputs = tuple(i.name for i in g.input if i.name in DATA_INPUTS)
    manifest = Manifest(graph=GRAPH, weights=WEIGHTS, weights_sha256=h.hexdigest(), weights_bytes=offset,
                        parameters=tuple(params), inputs=inputs, outputs=("scores",), tokenizer=tokenizer,
                        tied=tied, source=source | {"architecture": (config.architectures or ["?"])[0]})
    manifest.save(out)
    return manifest


def _embedding_name(g) -> str:
    for node in g.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "input_ids":
            return node.input[0]
    raise OrtzoError("cannot find the token embedding (a Gather on input_ids) in the exported graph")


_SCOPE = re.compile(r"^/(.+)/(MatMul|Gemm)(_\d+)?$")


def _pytorch_name(init, consumers, shapes, tied) -> tuple[str, bool] | None:
    """(PyTorch name, transposed) for a weight initializer; None for graph constants."""
    dims = tuple(init.dims)
    if init.name in shapes and shapes[init.name] == dims:
        return init.name, False
    for node in consumers.get(init.name, []):
        m = _SCOPE.match(node.name)
        if m and len(node.input) > 1 and node.input[1] == init.name:
            name = m.group(1).replace("/", ".") + ".weight"
            if shapes.get(name) == dims[::-1] or (name in tied and len(dims) == 2):
                return name, True
    return None


def _retie(g, init, original, base: str) -> str:
    """Replace a (transposed) copy of a tied weight by a Transpose of the original.

    Optimum de-duplicates only modules it knows (Gemma 3's scaled embedding is not one)."""
    from onnx import helper, numpy_helper

    if original is None:
        raise OrtzoError(f"tied weight {init.name} comes before the weight it is tied to")
    if not np.array_equal(numpy_helper.to_array(original, base).T, numpy_helper.to_array(init, base)):
        raise OrtzoError(f"{init.name} is meant to be tied to {original.name} but holds other values")
    out = f"{original.name}_transposed"
    g.node.insert(0, helper.make_node("Transpose", [original.name], [out], perm=[1, 0], name="ortzo/retie"))
    return out


def _add_scoring_head(g) -> None:
    """logits = hidden @ W  ->  scores = log_softmax(hidden[score_index] @ W)[score_ids]."""
    from onnx import TensorProto, helper

    producer = next((n for n in g.node if "logits" in n.output), None)
    if producer is None or producer.op_type != "MatMul":
        raise OrtzoError("unsupported graph: the logits output is not produced by a MatMul")
    hidden, w = producer.input
    by_output = {o: n for n in g.node for o in n.output}
    trans = by_output.get(w)
    weights = {i.name: i for i in g.input}
    if trans is not None and trans.op_type == "Transpose":
        src = trans.input[0]
        hsize = weights[src].type.tensor_type.shape.dim[1].dim_value
        head = helper.make_node("Gemm", ["ortzo/selected", src], ["ortzo/logits"], transB=1, name="ortzo/lm_head")
    else:
        hsize = weights[w].type.tensor_type.shape.dim[0].dim_value
        head = helper.make_node("MatMul", ["ortzo/selected", w], ["ortzo/logits"], name="ortzo/lm_head")
    g.initializer.append(helper.make_tensor("ortzo/flat_shape", TensorProto.INT64, [2], [-1, hsize]))
    g.node.remove(producer)
    g.node.extend([
        helper.make_node("Reshape", [hidden, "ortzo/flat_shape"], ["ortzo/flat_hidden"], name="ortzo/flatten"),
        helper.make_node("Gather", ["ortzo/flat_hidden", "score_index"], ["ortzo/selected"], axis=0, name="ortzo/select"),
        head,
        helper.make_node("LogSoftmax", ["ortzo/logits"], ["ortzo/logprobs"], axis=-1, name="ortzo/log_softmax"),
        helper.make_node("GatherElements", ["ortzo/logprobs", "score_ids"], ["scores"], axis=1, name="ortzo/pick"),
    ])
    g.input.extend([helper.make_tensor_value_info("score_index", TensorProto.INT64, ["n_scored"]),
                    helper.make_tensor_value_info("score_ids", TensorProto.INT64, ["n_scored", "n_candidates"])])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n_scored", "n_candidates"]))


def _cast_weights(g, names: list[str]) -> None:
    """Make weight inputs fp16, each cast to fp32 just before its first use, so that ORT need
    not hold every fp32 copy at once."""
    from onnx import TensorProto, helper

    for i in g.input:
        if i.name in names:
            i.type.tensor_type.elem_type = TensorProto.FLOAT16
    pending, nodes = set(names), []
    for node in g.node:
        for j, name in enumerate(node.input):
            if name in names:
                if name in pending:
                    nodes.append(helper.make_node("Cast", [name], [f"{name}/fp32"], to=TensorProto.FLOAT,
                                                  name=f"ortzo/cast/{name}"))
                    pending.discard(name)
                node.input[j] = f"{name}/fp32"
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)


def _prune(g) -> None:
    """Drop nodes no output depends on (the old lm_head Transpose), then unused initializers."""
    by_output = {o: n for n in g.node for o in n.output}
    needed, stack, live = set(), [o.name for o in g.output], set()
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        n = by_output.get(t)
        if n is not None and id(n) not in live:
            live.add(id(n))
            stack.extend(i for i in n.input if i)
            for attr in n.attribute:  # subgraphs (If/Loop) read outer names too
                for sub in list(attr.g.node if attr.g.node else []) + [x for gr in attr.graphs for x in gr.node]:
                    stack.extend(i for i in sub.input if i)
    kept = [n for n in g.node if id(n) in live]
    del g.node[:]
    g.node.extend(kept)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
