"""BigGAN (Brock, Donahue & Simonyan, 2019): class-conditional residual G/D with spectral norm everywhere, a shared
class embedding and hierarchical z feeding conditional BN, self-attention, and a projection discriminator.

Architectures, defaults and hyper-parameters follow BigGAN-PyTorch (``BigGAN.py``, ``layers.py``, ``scripts/``);
parameter counts match it exactly (see tests/unit/test_biggan.py). Its ``BigGAN.py`` has no 512² discriminator, so
that one follows the paper's table (ch→ch→2ch→4ch→8ch→8ch→16ch→16ch, then a 16ch block without downsampling).

``config`` (Config, HParams, the per-resolution block tables) · ``networks`` (G, D, ``build``) · ``recipe`` (the
training steps).
"""

from gan_models.biggan.config import RESOLUTIONS, Config, HParams, d_arch, g_arch
from gan_models.biggan.networks import DBlock, Discriminator, GBlock, Generator, build
from gan_models.biggan.recipe import Recipe

__all__ = [
    "RESOLUTIONS",
    "Config",
    "DBlock",
    "Discriminator",
    "GBlock",
    "Generator",
    "HParams",
    "Recipe",
    "build",
    "d_arch",
    "g_arch",
]
