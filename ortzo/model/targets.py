"""Target configs: how an execution provider runs the graph, read from `targets/*.toml`."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..errors import OrtzoError

LEVELS = ("DISABLE_ALL", "ENABLE_BASIC", "ENABLE_EXTENDED", "ENABLE_ALL")


@dataclass(frozen=True)
class Target:
    name: str
    providers: tuple[str, ...]
    provider_options: tuple[dict[str, Any], ...] = ()
    session: dict[str, Any] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)
    direction_threads: int = 0

    def session_options(self):  # -> onnxruntime.SessionOptions
        import onnxruntime as ort

        so = ort.SessionOptions()
        level = self.session.get("graph_optimization_level", "ENABLE_ALL")
        if level not in LEVELS:
            raise OrtzoError(f"target {self.name}: unknown graph_optimization_level {level!r}")
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{level}")
        so.intra_op_num_threads = int(self.session.get("intra_op_num_threads", 0))
        so.inter_op_num_threads = int(self.session.get("inter_op_num_threads", 0))
        so.enable_mem_pattern = bool(self.session.get("enable_mem_pattern", True))
        so.enable_cpu_mem_arena = bool(self.session.get("enable_cpu_mem_arena", True))
        for k, v in self.config.items():
            so.add_session_config_entry(k, str(v))
        return so

    def check_available(self) -> None:
        import onnxruntime as ort

        have = ort.get_available_providers()
        missing = [p for p in self.providers if p not in have]
        if missing:
            raise OrtzoError(f"target {self.name} needs {', '.join(missing)}; this onnxruntime has "
                             f"{', '.join(have)}")


def known_targets() -> list[str]:
    return sorted(p.name[:-5] for p in files("ortzo.target_files").iterdir() if p.name.endswith(".toml"))


def load_target(name_or_path: str) -> Target:
    """A target by name (`cpu`) or by the path of a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise OrtzoError(f"target file not found: {path}")
        text = path.read_text(encoding="utf-8")
    else:
        res = files("ortzo.target_files") / f"{name_or_path}.toml"
        if not res.is_file():
            raise OrtzoError(f"unknown target/provider {name_or_path!r}; known: {', '.join(known_targets())}")
        text = res.read_text(encoding="utf-8")
    try:
        d = tomllib.loads(text)
        return Target(name=d["name"], providers=tuple(d["providers"]),
                      provider_options=tuple(d.get("provider_options", ())),
                      session=dict(d.get("session", {})), config=dict(d.get("config", {})),
                      direction_threads=int(d.get("directions", {}).get("threads", 0)))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        raise OrtzoError(f"bad target file {name_or_path}: {type(e).__name__}: {e}") from None
