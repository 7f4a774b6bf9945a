"""The optimizer: float32 buffers and a loss function only (no ONNX, no tasks): directions (on
the CPU, and the same values as a CUDA kernel), the MeZO step and its replay, the step log."""
