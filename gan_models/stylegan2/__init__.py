"""StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN") with ADA/DiffAugment.

Networks: mapping network (lr multiplier 0.01, tracked w_avg, truncation), skip generator built from modulated and
demodulated convolutions with noise inputs, residual discriminator with minibatch stddev and projection-style
conditioning. Training: non-saturating logistic loss, lazy R1 and path-length regularisation, style mixing, G EMA by
half-life. Field names and defaults follow NVlabs' ``--cfg=stylegan2`` (stylegan3 repository, stylegan2-ada-pytorch).

``config`` (Config, HParams) · ``ops`` (FIR resampling, equalised-lr layers, modulated conv) · ``networks`` (G, D,
``build``) · ``recipe`` (the training cycle as a phase table).
"""

from gan_models.stylegan2.config import AUGMENTS, NOISE_MODES, Config, HParams
from gan_models.stylegan2.networks import (
    Discriminator,
    Generator,
    MappingNetwork,
    SynthesisNetwork,
    build,
    labels_to_onehot,
    num_params,
)
from gan_models.stylegan2.recipe import Recipe, path_lengths

__all__ = [
    "AUGMENTS",
    "NOISE_MODES",
    "Config",
    "Discriminator",
    "Generator",
    "HParams",
    "MappingNetwork",
    "Recipe",
    "SynthesisNetwork",
    "build",
    "labels_to_onehot",
    "num_params",
    "path_lengths",
]
