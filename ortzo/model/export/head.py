"""The scoring head that replaces full-vocabulary logits: log-probabilities of candidate ids
at chosen rows only, so a step never computes [batch, seq, vocab] logits.

`LmHead` is what the head reads (the final hidden state, the lm-head weight) and how it
projects rows to logits; `lm_head` reads it back from a trainable graph, so that the
full-logits graph (model/logits.py) projects exactly as the head does."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ...errors import OrtzoError

OUTPUT = "scores"
INPUTS = ("score_index", "score_ids")
FLAT_SHAPE = "ortzo/flat_shape"
FLATTEN, SELECT, LM_HEAD = "ortzo/flatten", "ortzo/select", "ortzo/lm_head"
LOG_SOFTMAX, PICK = "ortzo/log_softmax", "ortzo/pick"
NODES = (FLATTEN, SELECT, LM_HEAD, LOG_SOFTMAX, PICK)  # not the fp16 casts, also named ortzo/...


@dataclass(frozen=True)
class LmHead:
    """`hidden`: the final hidden state [batch, seq, hidden_size]; `node`: what projects rows
    [n, hidden_size] to logits [n, vocab] (its first input and output stand for those): a
    MatMul by the lm-head weight [hidden_size, vocab], a Gemm with transB by a tied embedding
    [vocab, hidden_size] (it keeps its layout for its Gather; no Transpose node runs at every
    forward, and providers that reject a MatMul with B an input take it), or a frozen base's
    MatMulNBits."""

    hidden: str
    node: Any  # onnx.NodeProto
    hidden_size: int

    def project(self, rows: str, out: str, name: str):  # -> onnx.NodeProto
        """The head's node reading `rows`, writing `out`."""
        node = copy.deepcopy(self.node)
        node.input[0], node.output[0], node.name = rows, out, name
        return node


def add_scoring_head(g) -> None:
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
        head = LmHead(hidden, helper.make_node("Gemm", ["rows", src], ["logits"], transB=1),
                      weights[src].type.tensor_type.shape.dim[1].dim_value)
    else:
        head = LmHead(hidden, helper.make_node("MatMul", ["rows", w], ["logits"]),
                      weights[w].type.tensor_type.shape.dim[0].dim_value)
    g.initializer.append(helper.make_tensor(FLAT_SHAPE, TensorProto.INT64, [2], [-1, head.hidden_size]))
    g.node.remove(producer)
    g.node.extend([
        helper.make_node("Reshape", [hidden, FLAT_SHAPE], ["ortzo/flat_hidden"], name=FLATTEN),
        helper.make_node("Gather", ["ortzo/flat_hidden", INPUTS[0]], ["ortzo/selected"], axis=0, name=SELECT),
        head.project("ortzo/selected", "ortzo/logits", LM_HEAD),
        helper.make_node("LogSoftmax", ["ortzo/logits"], ["ortzo/logprobs"], axis=-1, name=LOG_SOFTMAX),
        helper.make_node("GatherElements", ["ortzo/logprobs", INPUTS[1]], [OUTPUT], axis=1, name=PICK),
    ])
    g.input.extend([helper.make_tensor_value_info(INPUTS[0], TensorProto.INT64, ["n_scored"]),
                    helper.make_tensor_value_info(INPUTS[1], TensorProto.INT64, ["n_scored", "n_candidates"])])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["n_scored", "n_candidates"]))


def lm_head(g) -> LmHead:
    """The head of a trainable graph, read back from its scoring head's nodes."""
    from onnx import numpy_helper

    nodes = {n.name: n for n in g.node if n.name in (FLATTEN, LM_HEAD)}
    shape = next((i for i in g.initializer if i.name == FLAT_SHAPE), None)
    if len(nodes) < 2 or shape is None:
        raise OrtzoError("the graph has no ortzo scoring head (not written by `ortzo export`)")
    return LmHead(nodes[FLATTEN].input[0], nodes[LM_HEAD], int(numpy_helper.to_array(shape)[1]))
