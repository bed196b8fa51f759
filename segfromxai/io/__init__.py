"""Files in and out: images in (``images``: recursive, EXIF, odd modes, bad files recorded); the COCO dataset out
(``coco``) and its exports (``png``, ``yolo``), each registered once in ``exporters.EXPORTERS``, which the CLI's
``--format``, a run's finish, ``merge`` and ``--overwrite`` read; progress lines for logs (``progress``).

May import the base modules and :mod:`segfromxai.ops`; nothing about models, recipes or runs.
"""
