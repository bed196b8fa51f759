"""How a student is trained and used (:class:`StudentConfig`, every field a ``segfromxai student`` option), and the
digest of settings that says which checkpoint, token cache or finished round belongs to which training."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from ..registry import lookup
from ..stages.boundary import BOUNDARIES
from .heads import HEADS, SEGMENTERS
from .masks import SOFT_MAPS

UNTRAINED = ("rounds", "boundary", "soft")  # settings that do not change a round's head (its checkpoint key)
MODES = ("auto", "binary", "classes")
TRUNK_DTYPES = ("auto", "float32", "bfloat16")  # the trunk's precision (segfromxai.student.tokens.use_bf16)


def check_trunk_dtype(value: str) -> None:
    """Raise ValueError naming the valid choices unless ``value`` is one of :data:`TRUNK_DTYPES`."""
    if value not in TRUNK_DTYPES:
        raise ValueError(f"unknown trunk dtype {value!r}; choose one of {', '.join(TRUNK_DTYPES)}")
Mode = Literal[MODES]


@dataclass(frozen=True)
class StudentConfig:
    """How a student is trained and used (every field is a ``segfromxai student`` option).

    head : a name in :data:`HEADS`. mode : ``binary``, ``classes`` or ``auto`` (see
    :func:`segfromxai.student.targets.choose_mode`). epochs, lr, weight_decay, batch_size : AdamW on the head,
    batches of (image, view) pairs in an order drawn from ``(seed, round, epoch)``. max_area, min_score :
    label-cleaning filters (None: off). rounds : training rounds (round 1 on the pseudo-labels, each later one on
    the previous student's labels). confident : keep only pixels of the student's labels with a top probability at
    least this (None: all). flip : cache mirrored tokens too (flip augmentation). val_fraction, holdout : see
    :func:`segfromxai.student.data.split`. boundary : a name in :data:`segfromxai.stages.boundary.BOUNDARIES` for
    the predicted masks (None: the training run's recipe's method and parameters; another method runs with its
    defaults; ``none``: off).
    soft : the boundary method's soft map, a name in
    :data:`segfromxai.student.masks.SOFT_MAPS`. img_size : the trunk's input side in pixels (0: the classifier's
    own; see :func:`segfromxai.student.tokens.student_trunk`); 392 (28 x 28 tokens for the embedded ViT-S/14)
    measured better than its own 224 on synth; for a segmenter of :data:`SEGMENTERS` (``head`` ``lraspp`` or
    ``deeplabv3``, trained on the image itself at ``img_size``, 0: the classifier's input size) it is the training
    and prediction size. head_weights : a local state dict to start the head from
    (:func:`segfromxai.student.heads.load_head_weights`; e.g. an ImageNet MobileNetV3 for a segmenter's backbone),
    None: from scratch. blocks : the head reads the tokens of the trunk's last ``blocks`` blocks, each after the
    final norm, concatenated (:class:`segfromxai.student.tokens.LastBlocks`; at most the trunk's depth; 1: the
    last block's only; a segmenter of :data:`SEGMENTERS` reads the image and ignores it).
    trunk_dtype : ``auto``, ``float32`` or ``bfloat16``: the trunk's precision, for training and labelling alike
    (:func:`segfromxai.student.tokens.use_bf16`; ``auto``: bfloat16 where the device multiplies it natively).
    """

    head: str = "linear"
    mode: str = "auto"
    epochs: int = 30
    lr: float = 0.01
    weight_decay: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    max_area: float | None = None
    min_score: float | None = None
    rounds: int = 1
    confident: float | None = None
    flip: bool = True
    val_fraction: float = 0.2
    holdout: bool = True
    boundary: str | None = None
    soft: str = "ramp"
    img_size: int = 392
    head_weights: str | None = None
    blocks: int = 1
    trunk_dtype: str = "auto"

    @property
    def pixels(self) -> bool:
        """Whether the student reads the image itself (a torchvision segmenter) rather than the trunk's tokens."""
        return self.head in SEGMENTERS

    def __post_init__(self) -> None:
        lookup(HEADS, self.head, "student head")
        if self.boundary is not None and self.boundary not in BOUNDARIES:
            raise ValueError(f"unknown boundary method {self.boundary!r}; choose one of {', '.join(BOUNDARIES)}")
        lookup(SOFT_MAPS, self.soft, "soft map")
        check_trunk_dtype(self.trunk_dtype)
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1 (the trunk's last blocks whose tokens the head reads), got "
                             f"{self.blocks}")
        if self.img_size < 0:
            raise ValueError(f"img_size must be >= 0 (0: the classifier's own), got {self.img_size}")
        if self.mode not in MODES:
            raise ValueError(f"unknown student mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def settings_key(*parts: Any) -> str:
    """A short digest of JSON-serialisable settings (which checkpoint belongs to which training)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
