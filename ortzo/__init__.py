"""ortzo: fine-tune language models with MeZO through an ONNX Runtime inference session."""
