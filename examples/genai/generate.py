"""Greedy text from an onnxruntime-genai folder, without and with ortzo adapters, switched per
request over one loaded base: what an app does with `ortzo adapter`'s file.

    python examples/genai/generate.py FOLDER "prompt" [NAME=FILE.onnx_adapter ...]

A `\\n` in the prompt is a newline (make and shells pass it through as two characters).

Needs only onnxruntime-genai (the `genai` extra)."""
from __future__ import annotations

import sys

import onnxruntime_genai as og


def generate(model: og.Model, tokenizer: og.Tokenizer, prompt: str, adapters: og.Adapters | None = None,
             name: str | None = None, new_tokens: int = 12) -> str:
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    if name is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return tokenizer.decode(generator.get_sequence(0)[len(ids):])


def main(folder: str, prompt: str, *named: str) -> None:
    prompt = prompt.replace("\\n", "\n")
    model = og.Model(folder)
    tokenizer = og.Tokenizer(model)
    adapters = og.Adapters(model)
    for item in named:
        name, _, path = item.partition("=")
        adapters.load(path, name)
    print(f"base: {generate(model, tokenizer, prompt)!r}")
    for item in named:
        name = item.partition("=")[0]
        print(f"{name}: {generate(model, tokenizer, prompt, adapters, name)!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
