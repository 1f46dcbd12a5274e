"""The ``preprocess`` list of a spec as TorchRL transforms, run identically in serving and
training: the server applies them to the raw observation a client sends, a training env applies
them to what the environment yields.

``GrayScale`` and ``Resize`` are TorchRL's own classes with their torchvision call replaced by
the torch ops torchvision runs for tensors (the one workaround of this module): torchvision cannot
be installed next to the CPU torch 2.13.0 wheel (every torchvision build on the registry needs
CUDA torch; importing 0.28.0 fails with "operator torchvision::nms does not exist"), and TorchRL
imports it inside those two transforms. Names, arguments and results are TorchRL's, so a policy
trained with TorchRL's transforms is served identically.
"""

from __future__ import annotations

import torch
from torch.nn import functional
from torchrl.envs import CatFrames, Compose, ObservationNorm, ObservationTransform, ToTensorImage
from torchrl.envs import GrayScale as _TorchRLGrayScale
from torchrl.envs import Resize as _TorchRLResize

from service.registry.spec import (
    CatFramesSpec,
    GrayScaleSpec,
    ObservationNormSpec,
    ObservationSpec,
    PreprocessSpec,
    ResizeSpec,
    ToTensorImageSpec,
)

OBSERVATION = "observation"
DTYPES = {"float32": torch.float32, "uint8": torch.uint8}
# ITU-R 601-2 luma, torchvision's rgb_to_grayscale weights
LUMA = (0.2989, 0.587, 0.114)


class GrayScale(_TorchRLGrayScale):
    """TorchRL's ``GrayScale``: ``[..., 3, H, W]`` → ``[..., 1, H, W]`` in the input's dtype."""

    def _apply_transform(self, observation: torch.Tensor) -> torch.Tensor:
        if observation.shape[-3] == 1:
            return observation.clone()
        r, g, b = observation.unbind(dim=-3)
        gray = (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).to(observation.dtype)
        return gray.unsqueeze(-3)


class Resize(_TorchRLResize):
    """TorchRL's ``Resize(w, h)``: the last two dims become ``[w, h]``, antialiased, as
    torchvision resizes a tensor (``interpolate(..., antialias=True)``; integer images are
    interpolated in float and rounded back)."""

    def __init__(
        self,
        w: int,
        h: int | None = None,
        interpolation: str = "bilinear",
        in_keys: list | None = None,
        out_keys: list | None = None,
    ) -> None:
        # TorchRL's __init__ refuses to run without torchvision: set up what it would.
        in_keys = in_keys if in_keys is not None else ["pixels"]
        ObservationTransform.__init__(self, in_keys=in_keys, out_keys=out_keys or list(in_keys))
        self.w, self.h = int(w), int(h if h is not None else w)
        self.interpolation = interpolation

    def _apply_transform(self, observation: torch.Tensor) -> torch.Tensor:
        if observation.shape[-2:] == torch.Size([self.w, self.h]):
            return observation
        lead = observation.shape[:-3]
        x = observation.reshape(-1, *observation.shape[-3:])
        dtype = x.dtype
        if not x.is_floating_point():
            x = x.float()
        antialias = self.interpolation in ("bilinear", "bicubic")
        x = functional.interpolate(
            x,
            size=[self.w, self.h],
            mode=self.interpolation,
            align_corners=False if antialias else None,
            antialias=antialias,
        )
        if not dtype.is_floating_point:
            x = x.round_().clamp_(torch.iinfo(dtype).min, torch.iinfo(dtype).max).to(dtype)
        return x.reshape(*lead, *x.shape[-3:])


class ApplyTransforms(torch.nn.Module):
    """Transforms as a plain module over one tensor: each one's ``_apply_transform`` (the method
    a TorchRL transform overrides to say what it does to a tensor), in order."""

    def __init__(self, transforms: Compose) -> None:
        super().__init__()
        self.transforms = transforms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t._apply_transform(x)
        return x


def split_for_storage(
    observation: ObservationSpec, specs: list[PreprocessSpec]
) -> tuple[list[PreprocessSpec], list[PreprocessSpec]]:
    """``specs`` cut where the observation stops being ``uint8``: training envs apply the first
    part (so replay buffers store small uint8 frames), the policy the rest (e.g. the float
    ``observation_norm``). Applying both in order is applying ``specs``."""
    if not specs:
        return [], []
    x = torch.zeros(observation.shape, dtype=DTYPES[observation.dtype])
    cut = 0
    for i, s in enumerate(specs):
        x = _apply_one(s, x)
        if x.dtype != torch.uint8:
            break
        cut = i + 1
    return specs[:cut], specs[cut:]


def make_transform(spec: PreprocessSpec, key: str = OBSERVATION) -> ObservationTransform:
    """The TorchRL transform one preprocess entry describes, reading and writing ``key``."""
    keys = [key]
    if isinstance(spec, ToTensorImageSpec):
        return ToTensorImage(from_int=spec.from_int, dtype=DTYPES[spec.dtype], in_keys=keys)
    if isinstance(spec, GrayScaleSpec):
        return GrayScale(in_keys=keys)
    if isinstance(spec, ResizeSpec):
        return Resize(spec.w, spec.h, interpolation=spec.interpolation, in_keys=keys)
    if isinstance(spec, CatFramesSpec):
        return CatFrames(N=spec.N, dim=spec.dim, in_keys=keys, padding=spec.padding)
    if isinstance(spec, ObservationNormSpec):
        return ObservationNorm(
            loc=torch.tensor(spec.loc, dtype=torch.float32),
            scale=torch.tensor(spec.scale, dtype=torch.float32),
            standard_normal=spec.standard_normal,
            in_keys=keys,
        )
    raise ValueError(f"unknown preprocess entry {spec!r}")


def make_preprocess(specs: list[PreprocessSpec], key: str = OBSERVATION) -> Compose | None:
    """All of a spec's preprocess entries in order, or None when it has none."""
    if not specs:
        return None
    return Compose(*(make_transform(s, key) for s in specs))


def as_module(specs: list[PreprocessSpec]) -> ApplyTransforms | None:
    """Preprocess entries as one module over a tensor (what a policy runs in front of its
    network), or None when there are none."""
    compose = make_preprocess(specs)
    return None if compose is None else ApplyTransforms(compose)


def preprocessed_shape(observation: ObservationSpec, specs: list[PreprocessSpec]) -> tuple[list[int], str]:
    """Shape and dtype of one observation after ``specs`` (what the network reads).

    Raises:
        ValueError: when a transform does not fit the observation (e.g. GrayScale on 4 channels).
    """
    x = torch.zeros(observation.shape, dtype=DTYPES[observation.dtype])
    for s in specs:
        try:
            x = _apply_one(s, x)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ValueError(
                f"preprocess {s.type} does not fit an observation of shape {list(x.shape)}: {exc}"
            ) from None
    return list(x.shape), str(x.dtype).removeprefix("torch.")


def _apply_one(spec: PreprocessSpec, x: torch.Tensor) -> torch.Tensor:
    """One entry on one tensor (cat_frames: a first step, the frame repeated N times)."""
    if isinstance(spec, CatFramesSpec):
        return torch.cat([x] * spec.N, dim=spec.dim)
    return make_transform(spec)._apply_transform(x)


class FrameStack:
    """``cat_frames`` on a batch of single steps, with the history as explicit state (TorchRL's
    ``CatFrames`` keeps it inside the transform, one buffer per env, which a server holding many
    sessions cannot share): ``step(frame, history, starts) -> (stacked, next_history)``.

    ``history`` is ``[B, N-1, *frame]`` (oldest first); rows where ``starts`` is true begin an
    episode and take the frame itself as their history, as ``padding="same"`` does.
    """

    def __init__(self, spec: CatFramesSpec) -> None:
        self.n, self.dim = spec.N, spec.dim

    def initial(self, frame_shape: list[int], dtype: torch.dtype, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.n - 1, *frame_shape, dtype=dtype)

    def step(
        self, frame: torch.Tensor, history: torch.Tensor, starts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        repeated = frame.unsqueeze(1).expand(-1, self.n - 1, *frame.shape[1:])
        where = starts.reshape(-1, *([1] * (history.dim() - 1))).to(history.device)
        history = torch.where(where, repeated, history.to(frame.dtype))
        window = torch.cat([history, frame.unsqueeze(1)], dim=1)  # [B, N, *frame]
        return torch.cat(window.unbind(1), dim=self.dim), window[:, 1:]


def split_at_frames(
    specs: list[PreprocessSpec],
) -> tuple[list[PreprocessSpec], CatFramesSpec | None, list[PreprocessSpec]]:
    """``specs`` as (before cat_frames, the cat_frames entry or None, after it)."""
    for i, s in enumerate(specs):
        if isinstance(s, CatFramesSpec):
            return specs[:i], s, specs[i + 1 :]
    return specs, None, []
