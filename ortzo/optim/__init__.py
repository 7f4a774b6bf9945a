"""The optimizer: float32 buffers and a loss function only (no ONNX, no tasks): directions, the
MeZO step and its replay, the step log."""
