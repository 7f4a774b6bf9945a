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
TAIL = f"{LM_HEAD}/tail/"  # the head's elementwise nodes after its projection, numbered
ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Tanh")  # a bias (Phi), a soft-cap (Gemma 2), a logit scale (Cohere)
DATA = ("input_ids", "attention_mask", "position_ids")


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
    tail: tuple[Any, ...] = ()  # elementwise nodes on the projection's output, in order, as the graph has them

    def project(self, rows: str, out: str, name: str) -> list[Any]:
        """The head's nodes reading `rows`, writing `out`: the projection, then its tail."""
        node = copy.deepcopy(self.node)
        node.input[0], node.name = rows, name
        renamed = {self.node.output[0]: f"{name}/projected" if self.tail else out}
        node.output[0] = renamed[self.node.output[0]]
        nodes = [node]
        for i, t in enumerate(self.tail):
            t2 = copy.deepcopy(t)
            t2.input[:] = [renamed.get(x, x) for x in t.input]
            t2.output[0] = out if i == len(self.tail) - 1 else f"{name}/tail/{i}"
            t2.name = f"{name}/tail/{i}"
            renamed[t.output[0]] = t2.output[0]
            nodes.append(t2)
        return nodes


def add_scoring_head(g) -> None:
    """logits = tail(hidden @ W)  ->  scores = log_softmax(tail(hidden[score_index] @ W))[score_ids],
    where the tail is what the graph does elementwise after the projection (a bias, a soft-cap,
    a logit scale), applied to the selected rows only."""
    from onnx import TensorProto, helper

    by_output = {o: n for n in g.node for o in n.output}
    producer, tail = _projection(g, by_output)
    hidden, w = producer.input[:2]
    trans = by_output.get(w)
    weights = {i.name: i for i in g.input}
    if producer.op_type == "MatMulNBits":  # an int4 app model's head (model/genai.py): its constants stay
        node = copy.deepcopy(producer)
        node.input[0] = "rows"
        head = LmHead(hidden, node, next(a.i for a in node.attribute if a.name == "K"))
    elif trans is not None and trans.op_type == "Transpose":
        src = trans.input[0]
        head = LmHead(hidden, helper.make_node("Gemm", ["rows", src], [producer.output[0]], transB=1),
                      weights[src].type.tensor_type.shape.dim[1].dim_value)
    else:
        head = LmHead(hidden, helper.make_node("MatMul", ["rows", w], [producer.output[0]]),
                      weights[w].type.tensor_type.shape.dim[0].dim_value)
    head = LmHead(head.hidden, head.node, head.hidden_size, tuple(tail))
    g.initializer.append(helper.make_tensor(FLAT_SHAPE, TensorProto.INT64, [2], [-1, head.hidden_size]))
    for n in [producer, *tail]:
        g.node.remove(n)
    g.node.extend([
        helper.make_node("Reshape", [hidden, FLAT_SHAPE], ["ortzo/flat_hidden"], name=FLATTEN),
        helper.make_node("Gather", ["ortzo/flat_hidden", INPUTS[0]], ["ortzo/selected"], axis=0, name=SELECT),
        *head.project("ortzo/selected", "ortzo/logits", LM_HEAD),
        helper.make_node("LogSoftmax", ["ortzo/logits"], ["ortzo/logprobs"], axis=-1, name=LOG_SOFTMAX),
        helper.make_node("GatherElements", ["ortzo/logprobs", INPUTS[1]], [OUTPUT], axis=1, name=PICK),
    ])
    g.input.extend([helper.make_tensor_value_info(INPUTS[0], TensorProto.INT64, ["n_scored"]),
                    helper.make_tensor_value_info(INPUTS[1], TensorProto.INT64, ["n_scored", "n_candidates"])])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["n_scored", "n_candidates"]))


def _projection(g, by_output: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The node that projects hidden states to logits, and the elementwise nodes between it and
    the `logits` output (each continues the one input that depends on the model's data inputs;
    the others are weights or constants)."""
    data = {i.name for i in g.input if i.name in DATA}
    for n in g.node:  # graph order is topological: a closure in one pass
        if any(i in data for i in n.input):
            data.update(n.output)
    node, tail = by_output.get("logits"), []
    while node is not None and node.op_type in ELEMENTWISE:
        chain = [i for i in node.input if i in data]
        if len(chain) != 1:
            break
        tail.insert(0, node)
        node = by_output.get(chain[0])
    if node is None or node.op_type not in ("MatMul", "MatMulNBits"):
        found = f"{node.op_type}" if node is not None else "nothing"
        raise OrtzoError(f"unsupported graph: the logits are not a MatMul followed by elementwise {'/'.join(ELEMENTWISE)} "
                         f"(a bias, a soft-cap, a scale); they come from {found}")
    return node, tail


def lm_head(g) -> LmHead:
    """The head of a trainable graph, read back from its scoring head's nodes."""
    from onnx import numpy_helper

    nodes = {n.name: n for n in g.node if n.name in (FLATTEN, LM_HEAD)}
    shape = next((i for i in g.initializer if i.name == FLAT_SHAPE), None)
    if len(nodes) < 2 or shape is None:
        raise OrtzoError("the graph has no ortzo scoring head (not written by `ortzo export`)")
    tail = sorted((n for n in g.node if n.name.startswith(TAIL)), key=lambda n: int(n.name.removeprefix(TAIL)))
    return LmHead(nodes[FLATTEN].input[0], nodes[LM_HEAD], int(numpy_helper.to_array(shape)[1]), tuple(tail))
