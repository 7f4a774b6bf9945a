"""Target configs: how an execution provider runs the graph, read from `targets/*.toml`.

A target names its providers (in priority order, the CPU provider last as ORT's fallback),
their options, the session options the MeZO loop needs there, which graph file it loads
(`onnx`, or `ort` for ORT's mobile format) and where the weights live (`host` memory bound
zero-copy, or `cuda`: one device allocation bound once, perturbed on the device).
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from ..errors import OrtzoError

LEVELS = ("DISABLE_ALL", "ENABLE_BASIC", "ENABLE_EXTENDED", "ENABLE_ALL")
FORMATS = ("onnx", "ort")
DEVICES = ("host", "cuda")
PROBE = "probe.onnx"  # a MatMul whose B is a graph input, as every weight here is


@dataclass(frozen=True)
class Target:
    name: str
    providers: tuple[str, ...]
    provider_options: tuple[dict[str, Any], ...] = ()
    session: dict[str, Any] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)
    direction_threads: int = 0
    description: str = ""
    format: Literal["onnx", "ort"] = "onnx"
    device: Literal["host", "cuda"] = "host"
    install: str = ""  # how to get a build with these providers

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

    def unavailable(self) -> str | None:
        """Why this onnxruntime build cannot run the target here, or None if it can."""
        return _unavailable(self.providers, tuple(tuple(sorted(o.items())) for o in self.provider_options))

    def check_available(self) -> None:
        why = self.unavailable()
        if why:
            raise OrtzoError(f"target {self.name}: {why}{f'; {self.install}' if self.install else ''}")


@cache
def _unavailable(providers: tuple[str, ...], options: tuple[tuple[tuple[str, Any], ...], ...]) -> str | None:
    """A provider counts only if a session actually starts on it: onnxruntime-gpu lists CUDA
    on machines without a GPU, logs an error and silently falls back to the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    missing = [p for p in providers if p not in have]
    if missing:
        return f"this onnxruntime build has no {', '.join(missing)} (it offers {', '.join(have)})"
    probe = files("ortzo.target_files") / PROBE
    log: list[str] = []
    with _stderr_captured(log):
        try:
            session = ort.InferenceSession(probe.read_bytes(), providers=list(providers),
                                           provider_options=[dict(o) for o in options] or None)
        except Exception as e:  # ORT raises its own exception types for a provider that cannot start
            return f"{providers[0]} failed to start: {str(e).splitlines()[0]}"
    started = session.get_providers()
    failed = [p for p in providers if p not in started]
    if failed:
        causes = re.findall(r"with error: ([^\n\x1b]+)", "".join(log))
        return (f"{', '.join(failed)} is in this onnxruntime build but could not start here "
                f"({causes[0].strip() if causes else 'no device or driver?'}); sessions would run on "
                f"{', '.join(started)}")
    return None


@contextmanager
def _stderr_captured(into: list[str]) -> Iterator[None]:
    """ORT's C++ logger writes a failed provider's cause to fd 2: keep it (appended to `into`)
    for the one-line reason instead of letting it scroll past."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            into.append(f.read().decode(errors="replace"))


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
            raise OrtzoError(f"unknown target/provider {name_or_path!r}; known: {', '.join(known_targets())} "
                             "(or a target .toml file)")
        text = res.read_text(encoding="utf-8")
    try:
        d = tomllib.loads(text)
        t = Target(name=d["name"], providers=tuple(d["providers"]),
                   provider_options=tuple(d.get("provider_options", ())),
                   session=dict(d.get("session", {})), config=dict(d.get("config", {})),
                   direction_threads=int(d.get("directions", {}).get("threads", 0)),
                   description=str(d.get("description", "")), format=d.get("format", "onnx"),
                   device=d.get("device", "host"), install=str(d.get("install", "")))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        raise OrtzoError(f"bad target file {name_or_path}: {type(e).__name__}: {e}") from None
    if t.format not in FORMATS or t.device not in DEVICES:
        raise OrtzoError(f"bad target file {name_or_path}: format must be one of {', '.join(FORMATS)} and device "
                         f"one of {', '.join(DEVICES)} (got {t.format!r}, {t.device!r})")
    if t.provider_options and len(t.provider_options) != len(t.providers):
        raise OrtzoError(f"bad target file {name_or_path}: {len(t.provider_options)} provider_options tables for "
                         f"{len(t.providers)} providers")
    return t
