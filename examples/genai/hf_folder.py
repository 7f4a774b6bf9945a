"""A Hugging Face folder (fp32 safetensors, config, tokenizer) of a packaged GGUF alias, the
input onnxruntime-genai's model builder takes: what an app developer starts from.

    python examples/genai/hf_folder.py smollm2-135m /tmp/smollm2-hf

The tokenizer is ortzo's reading of the GGUF (transformers 4.57 misreads SmolLM2's start token),
its decoder the plain ByteLevel one that onnxruntime-genai's tokenizer implements."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ortzo.model.export.sources import resolve
from ortzo.model.export.tokenizer import export_tokenizer


def main(alias: str, out: Path) -> None:
    source = resolve(alias)
    gguf = Path(source.location)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    info = export_tokenizer(source, None, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    if (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel":  # onnxruntime-genai decodes a plain ByteLevel
        spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    tokens = spec["model"]["vocab"]
    by_id = {i: t for t, i in tokens.items()}
    eos = model.config.eos_token_id
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": info["add_bos"],
        "bos_token": by_id.get(info["bos_id"]), "eos_token": by_id.get(eos[0] if isinstance(eos, list) else eos),
        "pad_token": by_id.get(info["pad_id"])}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
