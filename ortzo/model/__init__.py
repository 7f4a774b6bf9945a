"""The trainable model folder: manifest, weight store, tokenizer, ORT session, targets, device
weights, export; the graphs derived from it (full logits, ORT format) and the ways in (prepare)
and out (bake)."""
