"""Labelling runs: :func:`~segfromxai.run.pipeline.label_batch`, the one chain of stages on a batch (``pipeline``);
which class each image is explained for (``targets``); the local and Ray engines (``local``, ``ray``); the run
folder, its manifest, artifacts and finish (``outdir``, ``manifest``, ``artifacts``); why a run gave no mask
(``diagnose``).

May import everything below it, up to :mod:`segfromxai.recipe`; never quality, student or the CLI.
"""
