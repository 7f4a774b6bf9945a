"""The scoring head that replaces full-vocabulary logits: log-probabilities of candidate ids
at chosen rows only, so a step never computes [batch, seq, vocab] logits."""
from __future__ import annotations

from ...errors import OrtzoError

OUTPUT = "scores"
INPUTS = ("score_index", "score_ids")


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
        hsize = weights[src].type.tensor_type.shape.dim[1].dim_value
        head = helper.make_node("Gemm", ["ortzo/selected", src], ["ortzo/logits"], transB=1, name="ortzo/lm_head")
    else:
        hsize = weights[w].type.tensor_type.shape.dim[0].dim_value
        head = helper.make_node("MatMul", ["ortzo/selected", w], ["ortzo/logits"], name="ortzo/lm_head")
    g.initializer.append(helper.make_tensor("ortzo/flat_shape", TensorProto.INT64, [2], [-1, hsize]))
    g.node.remove(producer)
    g.node.extend([
        helper.make_node("Reshape", [hidden, "ortzo/flat_shape"], ["ortzo/flat_hidden"], name="ortzo/flatten"),
        helper.make_node("Gather", ["ortzo/flat_hidden", INPUTS[0]], ["ortzo/selected"], axis=0, name="ortzo/select"),
        head,
        helper.make_node("LogSoftmax", ["ortzo/logits"], ["ortzo/logprobs"], axis=-1, name="ortzo/log_softmax"),
        helper.make_node("GatherElements", ["ortzo/logprobs", INPUTS[1]], [OUTPUT], axis=1, name="ortzo/pick"),
    ])
    g.input.extend([helper.make_tensor_value_info(INPUTS[0], TensorProto.INT64, ["n_scored"]),
                    helper.make_tensor_value_info(INPUTS[1], TensorProto.INT64, ["n_scored", "n_candidates"])])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["n_scored", "n_candidates"]))

