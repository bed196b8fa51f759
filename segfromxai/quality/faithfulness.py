"""Faithfulness metrics of explanation maps: deletion/insertion AUC, pointing game, average drop / increase.

Choices (stated, never silent):

- Maps are float ``(B, h, w)`` (token grid or pixel level, finite values). When they are not at the input size
  ``(H, W)`` they are upsampled with ``F.interpolate(mode="bilinear", align_corners=False)``.
- Score = softmax probability of the target class, from the model's logits ``(N, K)``.
- Ranking: pixels in descending order of the upsampled map; ties are broken by raster pixel index (row-major),
  ascending, through a stable sort, so the ranking is deterministic.
- Deletion / insertion curves (Petsiuk et al. 2018, RISE): at step ``i`` in ``0..steps`` the first
  ``n_i = floor(i * H * W / steps + 1/2)`` ranked pixels (round half up) are switched, all channels at once.
  Deletion switches them from the image to the substrate; insertion from the substrate to the image. Step 0 of
  deletion is the intact image, step ``steps`` of insertion is the intact image.
- Substrates live in the model's normalised input space: ``"zeros"`` is 0 there, i.e. the dataset mean colour;
  ``"blur"`` is the image blurred by ``torchvision.transforms.functional.gaussian_blur`` with kernel 11 and
  sigma 5 (reflect padding, so H and W must exceed 5). Deletion defaults to "zeros", insertion to "blur".
- AUC: trapezoid rule over x in [0, 1] with spacing ``1 / steps``, so AUC is in [0, 1] for probabilities.
  Deletion AUC: lower is better; insertion AUC: higher is better.
- Pointing game (Zhang et al. 2018; used by R-Cut, Niu et al. 2023): the map is upsampled to the mask size; a hit
  when ANY pixel attaining the maximum lies in the ground truth dilated by a disk of radius ``tolerance`` px
  (Zhang et al. use 15 px). So a constant map hits whenever the ground truth is non-empty. NaN for an empty mask.
- Average drop / increase in confidence (Chattopadhyay et al. 2018, Grad-CAM++; used by Hu et al. 2024): the map
  is min-max normalised per image to [0, 1] at its own resolution, then upsampled; the explanation image is
  ``x * map`` in the normalised input space (a 0 gives the mean colour, as the "zeros" substrate does). Both are
  NaN for a constant map (min-max undefined); the drop is also NaN when the original score is 0.

All values are per image; averaging over images is the caller's choice (:func:`drop_increase_summary` gives the
per-image means of the Grad-CAM++ paper). Model calls run under ``torch.no_grad()`` in chunks of ``batch_size``
images; the model is used as given (put it in eval mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torchvision.transforms.functional import gaussian_blur

from ..ops.resize import upsample_maps
from ..registry import Entry

SUBSTRATES = ("zeros", "blur")
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0

Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class MapMetric(Entry):
    """A per-image metric of explanation maps (an :class:`~segfromxai.registry.Entry`), its direction, and whether
    it calls the model (``requires`` holds ``"model"``).

    With ``needs_model`` the call shape is ``fn(model, x, maps, target, **options)``, otherwise
    ``fn(maps, gt_masks, **options)``; either returns a float ``(B,)`` array.
    """

    higher_is_better: bool

    @property
    def needs_model(self) -> bool:
        return "model" in self.requires


def as_maps(maps: torch.Tensor | np.ndarray, batch: int | None = None) -> torch.Tensor:
    """Maps as a finite float tensor (B, h, w); ValueError when the shape, batch size or values are wrong."""
    maps = torch.as_tensor(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, h, w), got shape {tuple(maps.shape)}")
    if batch is not None and maps.shape[0] != batch:
        raise ValueError(f"maps hold {maps.shape[0]} images, the input holds {batch}")
    if not maps.is_floating_point():
        maps = maps.float()
    if not torch.isfinite(maps).all():
        raise ValueError("maps must be finite")
    return maps


def _check_inputs(x: torch.Tensor, maps, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate x, target and maps; maps come back on x's device at their own resolution."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor (B, 3, H, W), got {getattr(x, 'shape', type(x))}")
    target = torch.as_tensor(target)
    if target.shape != (x.shape[0],) or target.is_floating_point():
        raise ValueError(f"target must be an integer tensor ({x.shape[0]},), got {target.dtype} {tuple(target.shape)}")
    return as_maps(maps, x.shape[0]).to(x.device), target.to(x.device, torch.long)


def check_positive_int(name: str, value: int) -> None:
    """ValueError unless ``value`` is an integer >= 1 (named ``name`` in the message)."""
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _substrate(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "zeros":
        return torch.zeros_like(x)
    if name == "blur":
        if min(x.shape[-2:]) <= BLUR_KERNEL // 2:
            raise ValueError(f"the blur substrate needs H and W > {BLUR_KERNEL // 2}, got {tuple(x.shape[-2:])}")
        return gaussian_blur(x, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])
    raise ValueError(f"unknown substrate {name!r}; valid choices: {', '.join(SUBSTRATES)}")


def _target_scores(model: Model, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = model(images)
    if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        raise ValueError(f"model must return logits ({images.shape[0]}, K), got {tuple(logits.shape)}")
    prob = torch.softmax(logits.double(), dim=1)
    return prob.gather(1, target[:, None])[:, 0].cpu()


def _ranks(maps: torch.Tensor) -> torch.Tensor:
    """(B, H*W) rank of each pixel: 0 for the largest value, ties in ascending pixel index."""
    flat = maps.reshape(maps.shape[0], -1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _curve(model: Model, x: torch.Tensor, maps, target: torch.Tensor, steps: int, substrate: str,
           batch_size: int, deletion: bool) -> np.ndarray:
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    maps, target = _check_inputs(x, maps, target)
    maps = upsample_maps(maps, tuple(x.shape[-2:]))
    sub = _substrate(x, substrate)
    start, end = (x, sub) if deletion else (sub, x)
    b_count, _, h, w = x.shape
    ranks = _ranks(maps).view(b_count, 1, h, w)
    counts = (2 * torch.arange(steps + 1, device=x.device) * h * w + steps) // (2 * steps)
    jobs = torch.arange(b_count * (steps + 1), device=x.device)
    scores = []
    with torch.no_grad():
        for job in jobs.split(batch_size):
            b, i = job // (steps + 1), job % (steps + 1)
            switched = ranks[b] < counts[i].view(-1, 1, 1, 1)
            scores.append(_target_scores(model, torch.where(switched, end[b], start[b]), target[b]))
    return torch.cat(scores).view(b_count, steps + 1).numpy()


def deletion_curve(model: Model, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, *, steps: int = 20,
                   substrate: str = "zeros", batch_size: int = 64) -> np.ndarray:
    """Target-class probability while the top-ranked pixels are replaced by a substrate (RISE deletion).

    Parameters
    ----------
    model : callable
        Maps a float tensor (N, C, H, W) of normalised inputs to logits (N, K).
    x : torch.Tensor
        Float (B, C, H, W), the normalised model input.
    maps : torch.Tensor
        Float (B, h, w), finite; upsampled bilinearly to (H, W) when (h, w) != (H, W). Higher = more important.
    target : torch.Tensor
        Integer (B,), class index per image.
    steps : int
        Number of deletion steps (>= 1); step i deletes floor(i * H * W / steps + 1/2) pixels.
    substrate : {"zeros", "blur"}
        What replaces deleted pixels: 0 in normalised space (the mean colour) or the Gaussian-blurred image.
    batch_size : int
        Images per model call.

    Returns
    -------
    np.ndarray
        Float64 (B, steps + 1) in [0, 1]; column 0 is the intact image. Lower area is better.
    """
    return _curve(model, x, maps, target, steps, substrate, batch_size, deletion=True)


def insertion_curve(model: Model, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, *, steps: int = 20,
                    substrate: str = "blur", batch_size: int = 64) -> np.ndarray:
    """Target-class probability while the top-ranked pixels of the image are inserted into a substrate.

    Parameters as in :func:`deletion_curve`; the default substrate is "blur". Column 0 is the substrate alone,
    column ``steps`` the intact image. Returns float64 (B, steps + 1) in [0, 1]. Higher area is better.
    """
    return _curve(model, x, maps, target, steps, substrate, batch_size, deletion=False)


def auc(curve: np.ndarray) -> np.ndarray:
    """Area under curves sampled at evenly spaced x in [0, 1]: trapezoid rule with spacing 1 / (T - 1).

    Parameters
    ----------
    curve : np.ndarray
        Float (B, T) or (T,), T >= 2 samples per curve.

    Returns
    -------
    np.ndarray
        Float (B,) (or a 0-d array for a single curve); in [0, 1] when the curve is.
    """
    curve = np.asarray(curve, dtype=np.float64)
    if curve.ndim not in (1, 2) or curve.shape[-1] < 2:
        raise ValueError(f"curve must be (B, T) or (T,) with T >= 2, got shape {curve.shape}")
    return np.trapezoid(curve, dx=1.0 / (curve.shape[-1] - 1), axis=-1)


def deletion_auc(model: Model, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, *, steps: int = 20,
                 substrate: str = "zeros", batch_size: int = 64) -> np.ndarray:
    """Float64 (B,) area under :func:`deletion_curve`, in [0, 1]; lower is better."""
    return auc(deletion_curve(model, x, maps, target, steps=steps, substrate=substrate, batch_size=batch_size))


def insertion_auc(model: Model, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, *, steps: int = 20,
                  substrate: str = "blur", batch_size: int = 64) -> np.ndarray:
    """Float64 (B,) area under :func:`insertion_curve`, in [0, 1]; higher is better."""
    return auc(insertion_curve(model, x, maps, target, steps=steps, substrate=substrate, batch_size=batch_size))


def pointing_game(maps: torch.Tensor | np.ndarray, gt_masks: torch.Tensor | np.ndarray, *,
                  tolerance: int = 0) -> np.ndarray:
    """Whether the map's maximum falls inside the ground truth (Zhang et al. 2018).

    Parameters
    ----------
    maps : torch.Tensor or np.ndarray
        Float (B, h, w), finite; upsampled bilinearly to the mask size (H, W).
    gt_masks : torch.Tensor or np.ndarray
        Bool (B, H, W) ground-truth masks.
    tolerance : int
        Radius in pixels of the disk the ground truth is dilated by (>= 0; Zhang et al. and R-Cut use 15).

    Returns
    -------
    np.ndarray
        Float64 (B,): 1.0 when any pixel attaining the maximum lies in the dilated ground truth, else 0.0;
        NaN when the ground truth is empty. Higher is better.
    """
    if isinstance(gt_masks, torch.Tensor):
        gt_masks = gt_masks.detach().cpu().numpy()
    gt = np.asarray(gt_masks)
    if gt.dtype != bool or gt.ndim != 3:
        raise ValueError(f"gt_masks must be bool (B, H, W), got {gt.dtype} {gt.shape}")
    if int(tolerance) != tolerance or tolerance < 0:
        raise ValueError(f"tolerance must be an integer >= 0, got {tolerance!r}")
    maps = upsample_maps(as_maps(maps, gt.shape[0]).detach().cpu(), gt.shape[1:]).numpy()
    peaks = maps == maps.max(axis=(1, 2), keepdims=True)
    if tolerance > 0:
        yy, xx = np.mgrid[-tolerance:tolerance + 1, -tolerance:tolerance + 1]
        disk = (yy**2 + xx**2 <= tolerance**2)[None]
        gt = ndimage.binary_dilation(gt, structure=disk)
    hit = (peaks & gt).any(axis=(1, 2)).astype(np.float64)
    hit[~np.asarray(gt_masks).any(axis=(1, 2))] = np.nan
    return hit


def average_drop_increase(model: Model, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, *,
                          batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per-image drop and increase in confidence on the explanation image x * map (Chattopadhyay et al. 2018).

    Parameters as in :func:`deletion_curve`. Each map is min-max normalised to [0, 1] at its own resolution, then
    upsampled. With Y the target probability of x and O that of x * map:

    Returns
    -------
    drop : np.ndarray
        Float64 (B,), ``max(0, Y - O) / Y * 100`` in [0, 100]; lower is better. NaN for a constant map or Y = 0.
    increase : np.ndarray
        Float64 (B,), 1.0 when O > Y else 0.0; higher is better. NaN for a constant map.
    """
    check_positive_int("batch_size", batch_size)
    maps, target = _check_inputs(x, maps, target)
    low, high = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    constant = (high <= low).flatten().cpu().numpy()
    maps = (maps - low) / torch.where(high > low, high - low, torch.ones_like(high))
    maps = upsample_maps(maps, tuple(x.shape[-2:]))
    images, targets = torch.cat([x, x * maps[:, None].to(x.dtype)]), torch.cat([target, target])
    with torch.no_grad():
        scores = torch.cat([_target_scores(model, images[j], targets[j])
                            for j in torch.arange(len(images), device=x.device).split(batch_size)])
    y, o = scores[: x.shape[0]].numpy(), scores[x.shape[0]:].numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = np.where(y > 0, np.maximum(0.0, y - o) / y * 100.0, np.nan)
    increase = (o > y).astype(np.float64)
    drop[constant], increase[constant] = np.nan, np.nan
    return drop, increase


def average_drop(model: Model, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, *,
                 batch_size: int = 64) -> np.ndarray:
    """Float64 (B,) drop in confidence, % in [0, 100]; lower is better. See :func:`average_drop_increase`."""
    return average_drop_increase(model, x, maps, target, batch_size=batch_size)[0]


def increase_in_confidence(model: Model, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, *,
                           batch_size: int = 64) -> np.ndarray:
    """Float64 (B,) 1.0 where x * map scores higher than x, else 0.0; higher is better. See average_drop_increase."""
    return average_drop_increase(model, x, maps, target, batch_size=batch_size)[1]


def drop_increase_summary(drop: np.ndarray, increase: np.ndarray) -> tuple[float, float]:
    """(average drop %, increase in confidence %): means over images, NaN entries skipped; NaN if none is left."""
    drop, increase = np.asarray(drop, np.float64), np.asarray(increase, np.float64)
    d, i = drop[~np.isnan(drop)], increase[~np.isnan(increase)]
    return (float(d.mean()) if d.size else float("nan"), float(i.mean() * 100.0) if i.size else float("nan"))


_MODEL = frozenset({"model"})

MAP_METRICS: dict[str, MapMetric] = {
    "deletion_auc": MapMetric(deletion_auc, "area under the class score as the most relevant pixels are deleted",
                              _MODEL, higher_is_better=False),
    "insertion_auc": MapMetric(insertion_auc, "area under the class score as the most relevant pixels are inserted",
                               _MODEL, higher_is_better=True),
    "pointing_game": MapMetric(pointing_game, "the map's maximum falls inside the ground truth",
                               higher_is_better=True),
    "average_drop": MapMetric(average_drop, "relative drop of the class score when only the map's pixels are kept",
                              _MODEL, higher_is_better=False),
    "increase_in_confidence": MapMetric(increase_in_confidence, "the class score rises when only the map's pixels "
                                        "are kept", _MODEL, higher_is_better=True),
}
