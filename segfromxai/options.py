"""The command line's options as small frozen dataclasses, the click option groups that build them, and the one place
where a command's recipes and classifier are resolved.

A group decorator (:data:`model_options`, :data:`features_options`, :func:`label_options`) declares its options once
and hands the command one dataclass in their place; a command then builds its own options (:class:`RunOptions`,
:class:`CompareOptions`, :class:`StudentOptions`, :class:`PredictOptions`) from its keyword arguments. Library
imports are made inside the functions, so that ``segfromxai --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import click

if TYPE_CHECKING:
    from .models.model import LoadedModel
    from .recipe.recipe import Recipe
    from .run.targets import Targets
    from .student.config import StudentConfig


@contextlib.contextmanager
def usage_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the exceptions ``kinds`` raised in the block into click usage errors (exit code 2), same message."""
    try:
        yield
    except kinds as e:
        raise click.UsageError(str(e)) from e


@contextlib.contextmanager
def disk_errors(out: Path) -> Iterator[None]:
    """A full disk (or quota) while writing ``out`` as one usage error (exit 2) instead of a traceback; what was
    written is whole (atomic writes), so ``--resume`` continues once there is space. Other OSErrors propagate."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" (writing {e.filename})" if e.filename else ""
        raise click.UsageError(f"no space left on the device of --out {out}{where}: free some space, then run the "
                               "same command with --resume") from e


def check_run_out(out: Path) -> None:
    """Refuse a bad --out (a file, unwritable, or not empty and holding no run) before the model loads."""
    from .run.outdir import check_out

    with usage_errors(ValueError, FileExistsError):
        check_out(out)


def check_out_outside_images(out: Path, images: Path) -> None:
    """A usage error when ``--out`` is ``--images`` or lies inside it (see :func:`~segfromxai.run.outdir.check_out_outside`)."""
    from .run.outdir import check_out_outside

    with usage_errors(ValueError):
        check_out_outside(out, images)


def _group(name: str, cls: type, fields: dict[str, str], *options: Callable) -> Callable:
    """A decorator that declares ``options`` (in this order) on a command and passes it one ``cls`` as ``name``,
    built from the options' parameters (``fields``: parameter name -> field name)."""
    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def command(*args: Any, **kw: Any) -> Any:
            kw[name] = cls(**{field: kw.pop(param) for param, field in fields.items()})
            return f(*args, **kw)

        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@dataclass(frozen=True)
class ModelOptions:
    """``--model`` / ``--checkpoint`` / ``--device``: the classifier to explain."""

    name: str | None = None
    checkpoint: Path | None = None
    device: str = "cpu"

    def args(self, recipes: Sequence[Recipe] = ()) -> dict[str, Any]:
        """:func:`segfromxai.models.model.load_model`'s arguments: the options, else the model the recipes name
        (a usage error when they name several and neither ``--model`` nor ``--checkpoint`` is given)."""
        named = {(r.model["name"], r.model["checkpoint"]) for r in recipes}
        if not named:
            return {"name": self.name, "device": self.device, "checkpoint": self.checkpoint}
        if len(named) > 1 and not (self.name or self.checkpoint):
            raise click.UsageError("the recipes name different models; compare runs one model (give --model/--checkpoint)")
        name, ckpt = named.pop() if len(named) == 1 else ("", "")
        return {"name": self.name or name or None, "device": self.device,
                "checkpoint": self.checkpoint or (Path(ckpt) if ckpt else None)}


@dataclass(frozen=True)
class FeatureOptions:
    """``--features-model`` / ``--features-checkpoint`` / ``--features-img-size``: the recipes' ``[features]``."""

    model: str | None = None
    checkpoint: str | None = None
    img_size: int | None = None

    def apply(self, recipe: Recipe) -> Recipe:
        """``recipe`` with these ``[features]`` keys (``None`` leaves a key as it is)."""
        from .recipe.recipe import with_features

        return with_features(recipe, model=self.model, checkpoint=self.checkpoint, img_size=self.img_size)


@dataclass(frozen=True)
class LabelOptions:
    """``--labels`` / ``--folder-labels``: the class to explain per image (default: the model's top-1)."""

    labels: Path | None = None
    folder_labels: bool = False

    def targets(self) -> Targets:
        """The label source; a bad CSV, or both options, is a usage error naming the problem."""
        from .run.targets import Targets, read_labels_csv

        if self.labels is not None and self.folder_labels:
            raise click.UsageError("give --labels or --folder-labels, not both")
        with usage_errors(ValueError):
            return (Targets("labels", read_labels_csv(self.labels)) if self.labels else
                    Targets("folders") if self.folder_labels else Targets())


model_options = _group(
    "model", ModelOptions, {"model_name": "name", "checkpoint": "checkpoint", "device": "device"},
    click.option("--model", "model_name", default=None,
                 help="timm model name (default: the embedded model in data/model)"),
    click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                 help="local weights: model card (card.json or its folder), .safetensors or torch file"),
    click.option("--device", default="cpu", show_default=True, help="torch device"))

features_options = _group(
    "features", FeatureOptions,
    {"features_model": "model", "features_checkpoint": "checkpoint", "features_img_size": "img_size"},
    click.option("--features-model", default=None,
                 help="where ncut's tokens come from: auto, classifier, embedded, dinov2 or a timm name "
                      "(default: the recipe's [features] model; a [domain.features] section is kept)"),
    click.option("--features-checkpoint", type=click.Path(exists=True, dir_okay=True), default=None,
                 help="local weights of the feature model (model card, .safetensors or torch file)"),
    click.option("--features-img-size", type=click.IntRange(min=1, max=1024), default=None,
                 help="run the feature model at this input size, from its patch to 1024 (a ViT-S/14 at 392 px: a "
                      "28x28 grid)"))


TRUNK_DTYPES = ("auto", "float32", "bfloat16")  # segfromxai.student.config's, kept here so --help loads no torch


def student_trunk_options(fn: Callable) -> Callable:
    """``segfromxai student``'s trunk: ``--img-size``, ``--blocks`` and ``--trunk-dtype`` (flat options)."""
    for opt in reversed((
        click.option("--img-size", type=click.IntRange(min=0), default=392, show_default=True,
                     help="the trunk's input side in pixels (0: the classifier's own; 392 gives a ViT-S/14 28 x 28 "
                          "tokens)"),
        click.option("--blocks", type=click.IntRange(min=1), default=1, show_default=True,
                     help="the head reads the trunk's last N blocks' tokens, concatenated (DINOv2's multi-layer "
                          "probe; with --head std-linear)"),
        click.option("--trunk-dtype", type=click.Choice(TRUNK_DTYPES), default="auto", show_default=True,
                     help="the trunk's precision, for training and labelling (auto: bfloat16 where the CPU or GPU "
                          "multiplies it natively)"))):
        fn = opt(fn)
    return fn


def label_options(labels_help: str, folder_help: str) -> Callable:
    """``--labels`` / ``--folder-labels`` (each command words its help), passed as ``labels``."""
    return _group("labels", LabelOptions, {"labels": "labels", "folder_labels": "folder_labels"},
                  click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                               help=labels_help),
                  click.option("--folder-labels", is_flag=True, help=folder_help))


seed_option = click.option("--seed", type=int, default=0, show_default=True)
limit_option = click.option("--limit", type=click.IntRange(min=1), default=None, help="the first N images only")
resume_option = click.option("--resume/--overwrite", default=None, help="continue an interrupted job in --out, or "
                             "start it again (default: refuse to touch one)")


def resolve_recipes(names: Sequence[str], features: FeatureOptions, output: dict[str, Any] | None = None
                    ) -> list[Recipe]:
    """The recipes of a command, with the ``--features-*`` options applied; a bad recipe is a usage error.

    With ``output`` (``run``), each name is one recipe (a file or a name in ``recipes/``) with those ``[output]``
    options replaced; without it (``compare``), a folder of recipes gives every recipe in it."""
    from .recipe.recipe import RecipeError, load_recipe, load_recipes, with_output

    with usage_errors(RecipeError, FileNotFoundError):
        recs = ([with_output(load_recipe(n), **output) for n in names] if output is not None else
                load_recipes(list(names)))
        return [features.apply(r) for r in recs]


def resolve_model(opts: ModelOptions, recipes: Sequence[Recipe] = ()) -> tuple[LoadedModel, dict[str, Any]]:
    """The one classifier of a command (see :meth:`ModelOptions.args`), loaded, and the arguments it was loaded with
    (Ray's actors load it again from them); a model that cannot be loaded is a usage error."""
    from .models.model import load_model

    args = opts.args(recipes)
    with usage_errors(ValueError, FileNotFoundError):
        return load_model(args["name"], args["checkpoint"], device=args["device"]), args


@dataclass(frozen=True)
class RunOptions:
    """``segfromxai run``'s options."""

    recipe: str
    images: Path
    out: Path
    model: ModelOptions
    labels: LabelOptions
    features: FeatureOptions
    min_confidence: float | None
    min_score: float | None
    batch_size: int
    seed: int
    formats: tuple[str, ...]
    limit: int | None
    resume: bool | None
    maps: bool
    overlays: bool
    gt: Path | None
    shard: int | None
    num_shards: int | None
    workers: int
    engine: str
    address: str | None
    skip_empty: bool

    def resolve_recipe(self) -> Recipe:
        """The recipe, with ``--min-confidence``, ``--min-score``, ``--maps``, ``--overlays`` and ``--features-*``
        applied."""
        output = {"min_confidence": self.min_confidence, "min_score": self.min_score, "maps": self.maps or None,
                  "overlays": self.overlays or None}
        return resolve_recipes([self.recipe], self.features, output)[0]

    def resolve_shard(self) -> tuple[int, int] | None:
        """``(--shard, --num-shards)``, checked by :func:`segfromxai.run.local.check_shard` (a usage error)."""
        from .run.local import check_shard

        with usage_errors(ValueError):
            return check_shard(self.shard, self.num_shards)


@dataclass(frozen=True)
class CompareOptions:
    """``segfromxai compare``'s options."""

    recipes: tuple[str, ...]
    images: Path
    gt: Path
    out: Path | None
    model: ModelOptions
    batch_size: int
    deletion_steps: int
    gae_images: int
    gae_steps: int
    resamples: int
    limit: int | None
    seed: int
    labels: LabelOptions
    features: FeatureOptions


@dataclass(frozen=True)
class StudentOptions:
    """``segfromxai student``'s options."""

    train_run: Path
    images: Path
    out: Path
    pseudo: Path | None
    gt: Path | None
    rounds: int
    val_fraction: float
    score_train: bool
    seed: int
    head: str
    mode: str
    epochs: int
    lr: float
    batch_size: int
    max_area: float | None
    min_score: float | None
    confident: float | None
    boundary: str | None
    soft: str
    img_size: int
    blocks: int
    trunk_dtype: str
    head_weights: str | None
    token_cache: Path | None
    resume: bool | None
    model: ModelOptions

    def config(self) -> StudentConfig:
        """The student's :class:`~segfromxai.student.config.StudentConfig` (a bad value is a usage error)."""
        from .student.config import StudentConfig

        with usage_errors(ValueError):
            return StudentConfig(head=self.head, mode=self.mode, epochs=self.epochs, lr=self.lr,
                                 batch_size=self.batch_size, seed=self.seed, max_area=self.max_area,
                                 min_score=self.min_score, rounds=self.rounds, confident=self.confident,
                                 val_fraction=self.val_fraction, holdout=not self.score_train,
                                 boundary=self.boundary, soft=self.soft, img_size=self.img_size,
                                 head_weights=self.head_weights, blocks=self.blocks,
                                 trunk_dtype=self.trunk_dtype)


@dataclass(frozen=True)
class PredictOptions:
    """``segfromxai student predict``'s options."""

    student: Path
    images: Path
    out: Path
    formats: tuple[str, ...]
    batch_size: int
    limit: int | None
    resume: bool | None
    gt: Path | None
    boundary: str | None
    skip_empty: bool
    device: str
