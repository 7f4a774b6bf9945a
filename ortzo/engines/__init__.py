"""Engines: what a run trains through. `ort` (the product: MeZO through an ONNX Runtime
inference session), and the PyTorch baselines `torch-bp` (backprop) and `torch-mezo` (MeZO
as its reference implementation does it). One interface (`base.Engine`); the recipe picks one
by name and never imports torch itself."""
