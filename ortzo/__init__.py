"""ortzo: fine-tune language models with MeZO through an ONNX Runtime inference session.

The API an app imports: `ortzo.open(folder)` gives a `Model` that serves inference (`run`,
`logits`, `generate`) and fine-tunes in place (`train`, `step`, `fit`), then `save`s; a
`Model.classifier(task)` supplies a task's prompts, batches and loss. Every problem a caller
can cause raises `OrtzoError`.

`open` is deliberately not in `__all__`: `from ortzo import *` must not shadow the built-in."""
from importlib.metadata import PackageNotFoundError, version

from .api import Classifier, Model, open  # noqa: A004
from .errors import OrtzoError
from .model.prepare import prepare

try:
    __version__ = version("ortzo")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

__all__ = ["Classifier", "Model", "OrtzoError", "prepare"]
