"""Files in and out: images in (``images``: recursive, EXIF, odd modes, bad files recorded), the COCO dataset and its
exports out (``coco``), progress lines for logs (``progress``).

May import the base modules and :mod:`segfromxai.ops`; nothing about models, recipes or runs.
"""
