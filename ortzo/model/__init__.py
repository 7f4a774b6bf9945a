"""The trainable model folder: manifest, weight store, tokenizer, ORT session, targets, export."""
