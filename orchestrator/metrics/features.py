"""Image → feature-vector extractors for Fréchet distances, and the rule for naming the resulting metric.

Only the standard Inception-v3 "2015-12-05" network gives ``fid``; any other extractor registered here (e.g. a
classifier trained on the dataset, for quick monitoring) gives ``fd_<name>`` (DESIGN.md §5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from orchestrator.metrics import inception

STANDARD_NETWORK = inception.NETWORK_NAME

ImageBatch = torch.Tensor | np.ndarray


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def metric_name(extractor_name: str) -> str:
    """``fid`` only for the standard Inception network; ``fd_<name>`` for anything else."""
    return "fid" if extractor_name == STANDARD_NETWORK else f"fd_{extractor_name}"


class FeatureExtractor:
    """Frozen network: images (uint8 in [0, 255] or float in [-1, 1]; N×3×H×W, N×1×H×W or N×H×W) → float32 N×dim.

    The default is the FID Inception-v3 loaded from ``weights`` (see ``inception.load_state_dict``); features come
    back on ``self.device`` so statistics can be accumulated (and all-reduced) there. Float images are quantized to
    uint8 levels first (``quantize=True``), so a generator's output scores exactly like the same images saved as PNG.
    Other networks pass ``network`` and their own ``name`` (and override ``network_input`` for their preprocessing).
    """

    def __init__(
        self,
        network: nn.Module | None = None,
        *,
        name: str | None = None,
        weights: inception.WeightsSource | None = None,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        quantize: bool = True,
        fuse_bn: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        if network is not None and (name is None or name == STANDARD_NETWORK):
            raise ValueError(f"a custom network needs its own name (not {STANDARD_NETWORK!r}): it does not give `fid`")
        if network is None:
            model = inception.load_inception(weights, device=self.device)
            network = model.fused() if fuse_bn else model
        self.network = network.eval().requires_grad_(False).to(self.device)
        self.name = name or STANDARD_NETWORK
        self.batch_size = batch_size
        self.quantize = quantize
        if self.device.type == "cuda":
            # cuDNN is usually faster in NHWC (not measured: no GPU here); on CPU, BN-fused NCHW measured faster.
            self.network = self.network.to(memory_format=torch.channels_last)

    @property
    def metric_name(self) -> str:
        return metric_name(self.name)

    def network_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """N×3×H×W float pixels in [0, 255] → what the network takes."""
        return inception.to_network_input(pixels)

    def to_pixels(self, images: ImageBatch) -> torch.Tensor:
        """Any accepted image batch → float32 N×3×H×W in [0, 255] on ``self.device``."""
        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images N×H×W, N×1×H×W or N×3×H×W, got shape {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float()
        elif x.is_floating_point():
            x = ((x.float() + 1) * 127.5).clamp_(0, 255)
            if self.quantize:
                x = x.round_()
        else:
            raise TypeError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {x.dtype}")
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    @contextlib.contextmanager
    def _fp32_numerics(self) -> Iterator[None]:
        # cuDNN convs default to TF32 on CUDA, which moves features by ~1e-3 relative; standard FID needs true fp32.
        if self.device.type != "cuda":
            yield
            return
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    def batches(self, images: ImageBatch) -> Iterator[ImageBatch]:
        for i in range(0, len(images), self.batch_size):
            yield images[i : i + self.batch_size]

    @torch.inference_mode()
    def extract(self, images: ImageBatch) -> torch.Tensor:
        out = []
        with self._fp32_numerics():
            for chunk in self.batches(images):
                x = self.network_input(self.to_pixels(chunk))
                if self.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                out.append(self.network(x).float())
        return torch.cat(out) if out else torch.empty(0, 0, device=self.device)


_FACTORIES: dict[str, Callable[..., FeatureExtractor]] = {STANDARD_NETWORK: FeatureExtractor}


def register_extractor(name: str, factory: Callable[..., FeatureExtractor]) -> None:
    """Make ``get_extractor(name)`` build ``factory(**kwargs)``; ``name`` must not be the standard network's."""
    if name == STANDARD_NETWORK:
        raise ValueError(f"{STANDARD_NETWORK!r} is reserved for the standard FID network")
    _FACTORIES[name] = factory


def get_extractor(name: str = STANDARD_NETWORK, **kwargs: object) -> FeatureExtractor:
    if name not in _FACTORIES:
        raise KeyError(f"unknown feature extractor {name!r}; registered: {', '.join(sorted(_FACTORIES))}")
    return _FACTORIES[name](**kwargs)


def registered() -> list[str]:
    """Names of the registered feature extractors (``inception`` plus domain extractors such as ``classifier``)."""
    return sorted(_FACTORIES)
