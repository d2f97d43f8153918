"""GAN architectures and their training recipes, in plain PyTorch (no Ray, S3 or MLflow here).

Each model package (``gan_models.biggan``, ``gan_models.stylegan2``: ``config``, ``networks``, ``recipe``) exposes:

* ``Config``   – architecture dataclass; fields mirror the paper's code, unset fields take the paper's
                 defaults for the resolution (``__post_init__``),
* ``HParams``  – training hyper-parameter dataclass (lrs, betas, loss, EMA, regularisers),
* ``build(cfg) -> (G, D)``,
* ``Recipe(cfg, hparams)`` – implements ``gan_models.protocol.Recipe`` on ``gan_models.recipe_base.RecipeBase``.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

_MODULES = {"biggan": "gan_models.biggan", "stylegan2": "gan_models.stylegan2"}


def names() -> list[str]:
    return sorted(_MODULES)


def module(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(names())}")
    return importlib.import_module(_MODULES[name])


def config(name: str, **overrides):
    """The architecture config for ``name`` with paper defaults, overridden by keyword."""
    cls = module(name).Config
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown {name} config key(s) {unknown}; valid: {', '.join(sorted(valid))}")
    return cls(**overrides)


def build(name: str, **overrides):
    """``build("biggan", resolution=128, ch=96, n_classes=1000) -> (G, D)``."""
    return module(name).build(config(name, **overrides))


def make_recipe(name: str, cfg, hparams):
    """The training recipe (``gan_models.protocol.Recipe``) for a model config and its hyper-parameters."""
    return module(name).Recipe(cfg, hparams)
