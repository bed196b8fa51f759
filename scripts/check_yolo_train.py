"""Check that a `segfromxai run --format yolo` export trains with ultralytics as written, from another folder.

    pip install ultralytics          # not a segfromxai dependency; `pip install 'segfromxai[yolo]'` pulls it in
    python scripts/check_yolo_train.py OUT/yolo/data.yaml [--epochs 1] [--imgsz 64]

Builds yolov8n-seg from its yaml (random weights: nothing is downloaded), trains it on the export for one epoch on
the CPU from a fresh temporary working directory (so a relative ``path:`` in data.yaml would fail, as it did), and
validates on the export's held-out ``val`` split. Prints the number of training and validation images ultralytics
found and the mask mAP50-95 of the (untrained, so near 0) model; exits 1 if training fails or finds no labels.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def train(data: Path, *, epochs: int = 1, imgsz: int = 64, batch: int = 4) -> dict:
    """Train yolov8n-seg (from its yaml) on ``data`` in a temporary working directory; the training summary."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    data = Path(data).resolve()
    here = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="yolo_check_") as work:
        os.chdir(work)  # ultralytics resolves a relative `path:` against the working directory
        try:
            model = YOLO("yolov8n-seg.yaml")
            model.train(data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, device="cpu", workers=0,
                        plots=False, amp=False, project=str(Path(work) / "runs"), name="check", exist_ok=True,
                        verbose=False)
            trainer = model.trainer
            n_train, n_val = len(trainer.train_loader.dataset), len(trainer.test_loader.dataset)
            labels = sum(len(lb["cls"]) for lb in trainer.train_loader.dataset.labels)
            metrics = trainer.metrics or {}
        finally:
            os.chdir(here)
    return {"train_images": n_train, "val_images": n_val, "train_instances": labels,
            "mask_map50_95": float(metrics.get("metrics/mAP50-95(M)", float("nan")))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="the export's data.yaml")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--imgsz", type=int, default=64)
    args = parser.parse_args(argv)
    summary = train(args.data, epochs=args.epochs, imgsz=args.imgsz)
    print(summary)
    ok = summary["train_images"] > 0 and summary["val_images"] > 0 and summary["train_instances"] > 0
    print("OK: the export trains" if ok else "FAILED: no training or validation labels found")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
