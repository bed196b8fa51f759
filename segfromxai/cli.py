"""Command-line interface: a thin shell over the library (each command parses options and calls one function)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .io.exporters import EXPORTERS
from .io.progress import LazyBar
from .options import (
    CompareOptions,
    ModelOptions,
    PredictOptions,
    RunOptions,
    StudentOptions,
    check_out_outside_images,
    check_run_out,
    disk_errors,
    features_options,
    label_options,
    limit_option,
    model_options,
    resolve_model,
    resolve_recipes,
    seed_option,
    resume_option,
    student_trunk_options,
    usage_errors,
)
from .version import __version__

if TYPE_CHECKING:
    from .models.model import LoadedModel
    from .recipe.recipe import Recipe
    from .run.targets import Targets


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="segfromxai")
def main() -> None:
    """segfromxai: segmentation pseudo-labels from classifier explanations."""


@main.command("list")
def list_cmd() -> None:
    """Print every registry (explainers, fusions, thresholds, refiners, boundaries, formats, metrics, student heads),
    one name per line under a header, with its summary; an explainer that needs a Vision Transformer or a
    classifier head says so after its name."""
    from .catalog import registries

    for title, registry in registries().items():
        click.echo(f"{title}:")
        for name in sorted(registry):
            e = registry[name]
            marks = [m for m, need in (("ViT", "vit"), ("head", "class"))
                     if title == "explainers" and need in e.requires]
            click.echo(f"  {name}" + (f"  [needs {', '.join(marks)}]" if marks else "") + f"  {e.summary}")
        if not registry:
            click.echo("  (none registered yet)")


@main.command()
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="output folder")
@click.option("--n", "n", type=click.IntRange(min=1), default=64, show_default=True, help="number of images")
@click.option("--seed", type=int, default=0, show_default=True, help="random seed (same seed, same bytes)")
@click.option("--size", type=click.IntRange(min=32), default=224, show_default=True, help="image side in pixels")
@click.option("--mode", type=click.Choice(["single", "multi"]), default="single", show_default=True,
              help="one object per image, or two of different classes")
def synth(out: Path, n: int, seed: int, size: int, mode: str) -> None:
    """Write a synthetic shapes benchmark with exact ground truth (images/, annotations.json, labels.csv)."""
    from .quality.synth import write_synth

    write_synth(out, n, seed, size=size, mode=mode)
    click.echo(f"wrote {n} images to {out}")


@main.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="a synth folder (labels.csv + images/) or an ImageFolder layout")
@click.option("--model", "model_name", required=True, help="timm model name, e.g. vit_small_patch14_dinov2")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="output folder: model.safetensors + card.json")
@click.option("--init", type=click.Path(exists=True, path_type=Path), default=None,
              help="local checkpoint to start from (safetensors, torch file or model card)")
@click.option("--freeze-blocks", type=click.IntRange(min=0), default=0, show_default=True,
              help="train only the blocks after K (ViT: frozen tokens cached once)")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--img-size", type=click.IntRange(min=16), default=None, help="input side (default: the model's)")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=float, default=5e-5, show_default=True, help="learning rate of the trunk")
@click.option("--head-lr", type=float, default=1e-3, show_default=True, help="learning rate of the new head")
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--val", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="separate validation folder (default: hold out --val-fraction of --data)")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="use at most N training images")
@click.option("--storage-dtype", type=click.Choice(["float16", "float32", "bfloat16"]), default="float16",
              show_default=True)
@seed_option
@click.option("--device", default="cpu", show_default=True)
def finetune(data: Path, model_name: str, out: Path, init: Path | None, freeze_blocks: int, epochs: int,
             img_size: int | None, batch_size: int, lr: float, head_lr: float, weight_decay: float,
             val: Path | None, val_fraction: float, limit: int | None, storage_dtype: str, seed: int,
             device: str) -> None:
    """Fine-tune a timm classifier; writes weights (safetensors) and a model card (JSON)."""
    from .models.finetune import finetune as run_finetune

    card = run_finetune(data, model_name, out, init=init, freeze_blocks=freeze_blocks, epochs=epochs,
                        img_size=img_size, batch_size=batch_size, lr=lr, head_lr=head_lr,
                        weight_decay=weight_decay, seed=seed, val=val, val_fraction=val_fraction, limit=limit,
                        storage_dtype=storage_dtype, device=device, log=click.echo)
    click.echo(f"wrote {out}/card.json (val accuracy {card['val_accuracy']:.4f})")


@main.command()
@click.option("--images", type=click.Path(exists=True, path_type=Path), required=True,
              help="image folder (searched recursively) or one image")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV file_name,label: print the accuracy per class against it")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write predictions as CSV (file_name,label,confidence)")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@model_options
def classify(images: Path, labels: Path | None, out: Path | None, batch_size: int, model: ModelOptions) -> None:
    """Top-1 class of every image; with --labels, a table of accuracy per class."""
    from .run.pipeline import classify as run_classify
    from .run.targets import accuracy_table, read_labels_csv

    with usage_errors(ValueError):
        truth = read_labels_csv(labels) if labels is not None else None
    loaded, _ = resolve_model(model)
    failures = []
    with usage_errors(ValueError):
        preds = run_classify(loaded, images, batch_size=batch_size, on_failure=failures.append)
    for f in failures:
        click.echo(f"skipped {f.path}: {f.reason}", err=True)
    if out is not None:
        from .run.targets import write_predictions_csv

        write_predictions_csv(out, preds, loaded.classes)
    click.echo(f"classified {len(preds)} images ({len(failures)} skipped) with {loaded.source}")
    if labels is not None:
        rows = accuracy_table(preds, loaded.classes, truth)
        click.echo(f"{'class':<12}{'n':>5}{'correct':>9}{'accuracy':>10}")
        for r in rows:
            click.echo(f"{r['class']:<12}{r['n']:>5}{r['correct']:>9}{r['accuracy']:>10.3f}")


@main.command()
@click.argument("recipe")
@click.option("--images", type=click.Path(exists=True, path_type=Path), required=True,
              help="image folder (searched recursively) or one image")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="output folder")
@model_options
@label_options("CSV file_name,label: explain these classes (images without a label are skipped)",
               "ImageFolder layout: explain the class named by each image's top folder")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=None,
              help="skip images whose explained class has a lower probability (default: the recipe's)")
@click.option("--min-score", type=click.FloatRange(0, 1), default=None,
              help="leave out masks whose quality score (the annotation's score, a label-free estimate of its IoU) "
              "is lower (default: the recipe's)")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True,
              help="images per chunk (the default keeps a default-recipe run under 1.5 GB peak RSS)")
@seed_option
@click.option("--format", "formats", type=click.Choice(sorted(EXPORTERS)), multiple=True,
              help="extra exports (repeatable); COCO is always written")
@limit_option
@click.option("--resume/--overwrite", default=None,
              help="continue an interrupted run in --out, or start it again (default: refuse to touch one)")
@click.option("--maps", is_flag=True, help="also save every map per image (maps/*.npz)")
@click.option("--overlays", is_flag=True, help="also save overlay PNGs (overlays/*.png)")
@click.option("--gt", type=click.Path(exists=True, path_type=Path), default=None,
              help="ground truth (COCO file or PNG label folder): evaluate the run, write metrics and report.html")
@click.option("--shard", type=click.IntRange(min=0), default=None, help="label only shard I of --num-shards")
@click.option("--num-shards", type=click.IntRange(min=1), default=None, help="split the images into N shards")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="processes that load and preprocess images while the model works")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: label chunks in a Ray Data actor pool (pip install 'segfromxai[ray]')")
@click.option("--address", default=None, help="with --engine ray: the cluster ('auto', or host:port); "
              "default: a local Ray started here")
@click.option("--skip-empty", is_flag=True, help="leave images without a mask out of pseudo_labels.json "
              "(default: kept, with no annotation)")
@features_options
def run(**kw: Any) -> None:
    """Label a folder of images with RECIPE (a TOML file, or the name of one in recipes/) and write COCO."""
    opts = RunOptions(**kw)
    rec = opts.resolve_recipe()
    shard = opts.resolve_shard()
    targets = opts.labels.targets()
    check_out_outside_images(opts.out, opts.images)
    check_run_out(opts.out)
    if opts.engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise click.UsageError("--engine ray needs Ray: pip install 'segfromxai[ray]'") from e
    model, model_args = resolve_model(opts.model, [rec])
    summary = _label(opts, rec, model, model_args, targets, shard)
    out = opts.out
    _echo_counts(summary, out)
    _echo_warnings(summary, opts.labels.labels, out)
    if opts.gt is not None and opts.skip_empty:
        click.echo("note: --skip-empty left the images without a mask out of pseudo_labels.json, so the evaluation "
                   "below lists them as having no prediction and leaves them out of the numbers", err=True)
    if opts.gt is not None:
        images = opts.images
        _evaluate(out / "pseudo_labels.json", opts.gt, None, out, images if images.is_dir() else images.parent,
                  out / "maps", {"recipe": summary["recipe"], "model": summary["model"],
                                 "versions": summary["versions"], "counts": summary["counts"]})


def _label(opts: RunOptions, rec: Recipe, model: LoadedModel, model_args: dict[str, Any], targets: Targets,
           shard: tuple[int, int] | None) -> dict[str, Any]:
    """Label the run with the local or the Ray engine, with a progress bar; returns the run summary."""
    from .run.local import run as run_recipe

    progress = LazyBar()
    common = dict(model=model, targets=targets, batch_size=opts.batch_size, limit=opts.limit, formats=opts.formats,
                  resume=bool(opts.resume), overwrite=opts.resume is False, seed=opts.seed, shard=shard,
                  progress=progress, skip_empty=opts.skip_empty)
    try:
        with usage_errors(FileExistsError, ValueError), disk_errors(opts.out):
            if opts.engine == "ray":
                from .run.ray import run_ray

                return run_ray(rec, opts.images, opts.out, model_args=model_args, address=opts.address, **common)
            return run_recipe(rec, opts.images, opts.out, workers=opts.workers, **common)
    finally:
        progress.close()


def _echo_counts(summary: dict, out: Path) -> None:
    c = summary["counts"]
    click.echo(f"{c['found']} images: {c['labelled']} labelled ({c['annotations']} masks), {c['no_mask']} without "
               f"a mask, {c['skipped']} skipped, {c['failed']} failed -> {out / 'pseudo_labels.json'}")
    if c["failed"]:
        click.echo(f"failures listed in {out / 'failures.jsonl'}", err=True)


def _echo_warnings(summary: dict, labels: Path | None, out: Path) -> None:
    w = summary.get("warnings") or {}
    if w.get("labels_without_image"):
        click.echo(f"warning: {w['labels_without_image']} rows of {labels} name no image (first: "
                   f"{', '.join(w['labels_without_image_first'][:5])}); listed in {out / 'run.json'}", err=True)
    if w.get("no_mask"):
        click.echo(f"warning: {w['no_mask']}", err=True)


def _evaluate(pred: Path, gt: Path | None, student: Path | None, out: Path | None, images: Path | None,
              maps: Path | None, settings: dict, class_agnostic: bool = False) -> None:
    import warnings

    from .quality.evaluate import comparisons, headline, table, worst, write_evaluation, write_evaluation_report

    with usage_errors(ValueError, FileNotFoundError), warnings.catch_warnings():  # warnings shown once below
        warnings.simplefilter("ignore")
        results = comparisons(pred, gt=gt, student=student, class_agnostic=class_agnostic)
    for message in dict.fromkeys(w for r in results.values() for w in r["warnings"]):
        click.echo(f"warning: {message}", err=True)
    click.echo(table({name: headline(r) for name, r in results.items()}))
    first_name, first = next(iter(results.items()))
    click.echo(f"{first['n_images']} images ({first_name}); per image = mean over images, pooled = over all pixels")
    if first["missing_in_pred"]:
        click.echo(f"{len(first['missing_in_pred'])} reference images have no prediction (failed or skipped)")
    if out is not None:
        with disk_errors(out):
            write_evaluation(out, results)
            report = write_evaluation_report(out, results, settings=settings, images=images, maps=maps)
        shown = ", ".join(f"{r['file_name']} ({r['iou']:.2f})" for r in worst(first, 5))
        click.echo(f"worst images by IoU: {shown}")
        click.echo(f"wrote {out / 'metrics.json'}, {out / 'per_image.csv'}, {report}")


@main.command("evaluate")
@click.option("--pred", type=click.Path(exists=True, path_type=Path), required=True,
              help="predicted masks: COCO file or folder of PNG label maps")
@click.option("--gt", type=click.Path(exists=True, path_type=Path), default=None,
              help="ground truth: COCO file or folder of PNG label maps")
@click.option("--student", type=click.Path(exists=True, path_type=Path), default=None,
              help="a student segmenter's masks: adds student vs GT and pseudo vs student agreement")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="write metrics.json, per_image.csv and report.html here")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="the image folder, for the report's contact sheets")
@click.option("--class-agnostic", is_flag=True, help="treat every mask as one category 'object' on both sides "
              "(for masks without classes, e.g. a 0/1 PNG student)")
def evaluate_cmd(pred: Path, gt: Path | None, student: Path | None, out: Path | None, images: Path | None,
                 class_agnostic: bool) -> None:
    """Score predicted masks against ground truth and/or a student's masks (images matched by file name)."""
    maps = pred.parent / "maps" if pred.is_file() else None
    _evaluate(pred, gt, student, out, images, maps if maps is not None and maps.is_dir() else None,
              {"pred": str(pred), "gt": str(gt), "student": str(student), "class_agnostic": class_agnostic},
              class_agnostic)


@main.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="output folder")
@click.option("--format", "formats", type=click.Choice(sorted(EXPORTERS)), multiple=True,
              help="extra exports (repeatable); COCO is always written")
@click.option("--index-only", is_flag=True, help="keep the parts sharded: write only out/index.json listing them")
@click.option("--overwrite", is_flag=True, help="replace an earlier merge in --out")
@click.option("--skip-empty", is_flag=True, help="leave images without a mask out of pseudo_labels.json")
def merge_cmd(parts: tuple[Path, ...], out: Path, formats: tuple[str, ...], index_only: bool, overwrite: bool,
              skip_empty: bool) -> None:
    """Combine the output folders of a sharded run (run --shard I --num-shards N) into one COCO dataset."""
    from .run.outdir import merge

    with usage_errors(ValueError, FileExistsError):
        summary = merge(list(parts), out, formats=formats, index_only=index_only, overwrite=overwrite,
                        skip_empty=skip_empty)
    if index_only:
        click.echo(f"{len(parts)} parts indexed -> {out / 'index.json'}")
        return
    c = summary["counts"]
    click.echo(f"{len(parts)} parts, {c['found']} images: {c['labelled']} labelled ({c['annotations']} masks), "
               f"{c['failed']} failed, {c['skipped']} skipped -> {out / 'pseudo_labels.json'}")
    if summary["missing_shards"]:
        click.echo(f"missing shards: {summary['missing_shards']}", err=True)


@main.command("compare")
@click.argument("recipes", nargs=-1, required=True)
@click.option("--images", type=click.Path(exists=True, path_type=Path), required=True, help="image folder")
@click.option("--gt", type=click.Path(exists=True, path_type=Path), required=True,
              help="ground truth: COCO file or folder of PNG label maps")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="write compare.json and compare.csv here")
@model_options
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--deletion-steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--gae-images", type=click.IntRange(min=0), default=16, show_default=True,
              help="GAE on the first N images (each costs 2 x steps - 1 more explanations; 0: no GAE)")
@click.option("--gae-steps", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--resamples", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="bootstrap resamples of the paired IoU interval against the first recipe (seed 0)")
@limit_option
@seed_option
@label_options("CSV file_name,label: explain these classes, as run --labels does",
               "ImageFolder layout: the top folder names the class")
@features_options
def compare_cmd(**kw: Any) -> None:
    """Run several RECIPES (files, names, or folders of recipes such as `vitmix`) on the same images, sharing
    model passes, and print IoU, F1, PA, deletion AUC, GAE, time and forward passes per image against the ground
    truth; then every recipe against the first (mean per-image IoU difference, paired bootstrap 95% interval,
    images better and worse by more than 0.02) and each recipe's mean IoU per subset."""
    from .quality.compare import compare, format_rows, write_comparison
    from .quality.paired import format_evidence

    opts = CompareOptions(**kw)
    recs = resolve_recipes(opts.recipes, opts.features)
    model, _ = resolve_model(opts.model, recs)
    targets = opts.labels.targets()
    with usage_errors(ValueError, FileNotFoundError):
        result = compare(recs, opts.images, opts.gt, model=model, batch_size=opts.batch_size,
                         deletion_steps=opts.deletion_steps, gae_images=opts.gae_images, gae_steps=opts.gae_steps,
                         limit=opts.limit, seed=opts.seed, targets=targets, resamples=opts.resamples)
    click.echo(format_rows(result["rows"]))
    click.echo(f"{result['n_images']} images, {len(result['failures'])} unreadable; IoU/F1/PA per-image means, "
               f"deletion AUC lower is better, GAE (higher is better) on the first {opts.gae_images} images, "
               f"s/img = the recipe alone on this machine")
    click.echo("")
    click.echo(format_evidence(result["paired"], result["subsets"], [r.name for r in recs],
                               resamples=opts.resamples))
    if opts.out is not None:
        write_comparison(opts.out, result)
        click.echo(f"wrote compare.json and its CSV files to {opts.out}")


@main.group("student", invoke_without_command=True)
@click.option("--train", "train_run", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="a run folder: the student learns its pseudo_labels.json on the images it labelled  [required]")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="images to predict (the training folder: only a held-out share, see --val-fraction)  [required]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="output folder  [required]")
@click.option("--pseudo", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="a run folder over --images: its pseudo-labels join the table (pseudo vs GT, pseudo vs student)")
@click.option("--gt", type=click.Path(exists=True, path_type=Path), default=None,
              help="ground truth of --images (COCO file or PNG label folder): print and write the table")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="training rounds: round 1 on the pseudo-labels, each later one on the student's own labels")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="share held out (by a hash of file names) when --images is the training folder")
@click.option("--score-train", is_flag=True, help="with --images the training folder: train on every image and "
              "predict every image (scores then include images the student trained on)")
@seed_option
@click.option("--head", default="linear", show_default=True,
              help="the trainable head on the frozen trunk's tokens, or a torchvision segmenter trained on the images "
                   "(lraspp, deeplabv3; `segfromxai list`: student heads)")
@click.option("--mode", type=click.Choice(["auto", "binary", "classes"]), default="auto", show_default=True,
              help="foreground vs background, or one channel per category (auto: classes when images hold several)")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-area", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="drop training images whose mask covers more than this share of the image (e.g. 0.5)")
@click.option("--min-score", type=click.FloatRange(min=0), default=None,
              help="drop training masks scored below this")
@click.option("--confident", type=click.FloatRange(0, 1), default=None,
              help="self-training: keep only pixels whose top probability reaches this (others ignored)")
@click.option("--boundary", default=None, help="boundary method for the student's masks (`segfromxai list`: "
              "boundaries; default: the training run's recipe's method and parameters; none: off)")
@click.option("--soft", default="ramp", show_default=True,
              help="the boundary method's soft map: probs (the student's own) or ramp (one token around its mask)")
@student_trunk_options
@click.option("--head-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a local state dict (.safetensors or torch) to start the head from, e.g. ImageNet MobileNetV3 "
                   "weights for --head lraspp/deeplabv3 (torchvision segmenters trained on the images; want a GPU)")
@click.option("--token-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for the trunk's cached tokens, reused by later jobs on the same images [default: OUT/tokens]")
@resume_option
@model_options
@click.pass_context
def student_cmd(ctx: click.Context, **kw: Any) -> None:
    """Train a student segmenter (a light head on the frozen classifier trunk) on a run's pseudo-labels, predict
    --images (student_labels.json), self-train --rounds, and with --gt print the table after each round.

    `segfromxai student predict --student DIR --images DIR --out DIR` labels a folder with a trained student."""
    from .student.job import check_inputs, train_student

    if ctx.invoked_subcommand is not None:
        if any(kw[k] is not None for k in ("train_run", "images", "out")):
            raise click.UsageError(f"the training options go without a subcommand: `segfromxai student "
                                   f"{ctx.invoked_subcommand}` takes its own (see its --help)")
        return
    for param in ("train_run", "images", "out"):
        if kw[param] is None:
            raise click.MissingParameter(ctx=ctx, param=next(p for p in ctx.command.params if p.name == param))
    opts = StudentOptions(**kw)
    config, resume, overwrite = opts.config(), bool(opts.resume), opts.resume is False
    check_out_outside_images(opts.out, opts.images)
    with usage_errors(ValueError, FileExistsError):  # before the model loads
        check_inputs(opts.out, config, resume=resume, overwrite=overwrite)
    model, _ = resolve_model(opts.model)
    cache = opts.token_cache.resolve() if opts.token_cache is not None else "tokens"
    with usage_errors(ValueError, FileExistsError):
        summary = train_student(opts.train_run, opts.images, opts.out, model=model, config=config, gt=opts.gt,
                                pseudo=opts.pseudo, progress=True, log=click.echo, cache=cache, resume=resume,
                                overwrite=overwrite)
    held = " (held out of training)" if summary["held_out"] else ""
    click.echo(f"{summary['n_predicted']} images predicted{held} -> {opts.out / 'student_labels.json'}")


@student_cmd.command("predict")
@click.option("--student", "student", type=click.Path(exists=True, path_type=Path), required=True,
              help="a trained student: the folder `segfromxai student` wrote (its last round), a round_<r> folder "
                   "or its card.json")
@click.option("--images", type=click.Path(exists=True, path_type=Path), required=True,
              help="image folder (searched recursively) or one image")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="output folder")
@click.option("--format", "formats", type=click.Choice(sorted(EXPORTERS)), multiple=True,
              help="extra exports (repeatable); COCO is always written")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="images per chunk")
@limit_option
@resume_option
@click.option("--gt", type=click.Path(exists=True, path_type=Path), default=None,
              help="ground truth (COCO file or PNG label folder): evaluate the masks, write metrics and report.html")
@click.option("--boundary", default=None, help="boundary method for the masks (default: the student's own)")
@click.option("--skip-empty", is_flag=True, help="leave images without a mask out of pseudo_labels.json")
@click.option("--device", default="cpu", show_default=True, help="torch device")
def student_predict_cmd(**kw: Any) -> None:
    """Label a folder with a trained student and write what `run` writes (COCO, exports, run.json, failures)."""
    from .student.label import label_folder, open_student

    opts = PredictOptions(**kw)
    check_out_outside_images(opts.out, opts.images)
    check_run_out(opts.out)
    with usage_errors(ValueError, FileNotFoundError):
        student = open_student(opts.student, boundary=opts.boundary, device=opts.device)
    progress = LazyBar()
    try:
        with usage_errors(FileExistsError, ValueError):
            summary = label_folder(student, opts.images, opts.out, batch_size=opts.batch_size, limit=opts.limit,
                                   formats=opts.formats, resume=bool(opts.resume), overwrite=opts.resume is False,
                                   progress=progress, skip_empty=opts.skip_empty)
    finally:
        progress.close()
    _echo_counts(summary, opts.out)
    if opts.gt is not None:
        images = opts.images if opts.images.is_dir() else opts.images.parent
        _evaluate(opts.out / "pseudo_labels.json", opts.gt, None, opts.out, images, None,
                  {k: summary[k] for k in ("recipe", "model", "versions", "counts")})


def _entry() -> None:  # pragma: no cover - `python -m segfromxai`
    main(prog_name="segfromxai")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_entry())
