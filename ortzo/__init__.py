"""ortzo: fine-tune language models with MeZO through an ONNX Runtime inference session.

The API an app imports: `ortzo.open(folder)` gives a `Model` that serves inference (`run`,
`logits`, `generate`) and fine-tunes in place (`train`, `step`, `fit`), then `save`s; a
`Model.classifier(task)` supplies a task's prompts, batches and loss."""
from .api import Classifier, Model, open  # noqa: A004
from .model.prepare import prepare

__all__ = ["Classifier", "Model", "open", "prepare"]
