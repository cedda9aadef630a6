"""Old flat module names (before the layered layout) as aliases of where their code lives now.

MLflow models registered before the layout change carry a ``python_model`` file that imports
``grace.modeling_grace``; scripts may import the old names too. Each alias module looks a name
up in the new modules listed for it and warns once that the name moved.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED: dict[str, tuple[str, ...]] = {
    "grace.records": ("grace.data.records",),
    "grace.imageset": ("grace.data.imageset",),
    "grace.synth": ("grace.data.synth",),
    "grace.importers": ("grace.data.importers",),
    "grace.validation": ("grace.data.validation",),
    "grace.versioning": ("grace.data.versioning",),
    "grace.identifiers.identifier_map": ("grace.identifiers.id_map",),
    "grace.tokenization": ("grace.models.tokenization",),
    "grace.embedding": ("grace.models.embedders", "grace.identifiers.base"),
    "grace.configuration_grace": (
        "grace.training.config",
        "grace.models.prompts",
        "grace.models.settings",
        "grace.constants",
    ),
    "grace.modeling_backbone": (
        "grace.models.backbone",
        "grace.models.tiny",
        "grace.models.factory",
    ),
    "grace.modeling_grace_lite": (
        "grace.models.lite.modeling_lite",
        "grace.models.lite.configuration_lite",
        "grace.models.settings",
    ),
    "grace.processing_grace_lite": ("grace.models.lite.processing_lite",),
    "grace.frozen_encoders": ("grace.models.lite.frozen_encoders",),
    "grace.alignment_distillation": ("grace.models.lite.losses", "grace.training.distillation"),
    "grace.configuration_dual_encoder": ("grace.models.dual_encoder.configuration",),
    "grace.modeling_dual_encoder": ("grace.models.dual_encoder.modeling",),
    "grace.training_dual_encoder": ("grace.models.dual_encoder.training",),
    "grace.trie": ("grace.retrieval.trie",),
    "grace.identifier_index": ("grace.retrieval.index",),
    "grace.llama_steps": ("grace.retrieval.fused_llama",),
    "grace.beam_search": ("grace.retrieval.beam_search",),
    "grace.modeling_grace": ("grace.retrieval.retriever",),
    "grace.task_examples": ("grace.training.examples", "grace.models.prompts", "grace.constants"),
    "grace.training_grace": ("grace.training", "grace.training.loop", "grace.training.schedule"),
    "grace.distributed_training": ("grace.training.distributed",),
    "grace.deepspeed_engine": ("grace.training.engine",),
    "grace.pseudo_queries": ("grace.training.pseudo_queries",),
    "grace.cached_negatives": ("grace.training.cached_negatives",),
    "grace.incremental": ("grace.training.incremental", "grace.evaluation.incremental"),
    "grace.query_benchmark": ("grace.evaluation.query_latency", "grace.evaluation.latency_report"),
    "grace.tracking": ("grace.workflow.tracking",),
    "grace.registry": ("grace.workflow.model_registry",),
    "grace.mlflow_model": ("grace.workflow.pyfunc",),
    "grace.watching": ("grace.workflow.watcher",),
    "grace.pipeline_steps": ("grace.workflow.steps",),
}
"""Old module name -> the modules its names moved to, searched in order."""


class _AliasModule(types.ModuleType):
    def __getattr__(self, name: str):
        for target in self.__grace_targets__:
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        module = _AliasModule(spec.name)
        module.__grace_targets__ = MOVED[spec.name]
        return module

    def exec_module(self, module) -> None:
        warnings.warn(
            f"{module.__name__} moved to {', '.join(MOVED[module.__name__])}; "
            "the old name is an alias for one release",
            DeprecationWarning,
            stacklevel=2,
        )


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, _Loader())
        return None


def install() -> None:
    """Make the old module names importable (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
