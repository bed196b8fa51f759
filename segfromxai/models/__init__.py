"""The networks: loading a classifier and its model card (``model``), forward hooks as context managers (``hooks``),
feature backbones whose tokens the cut reads (``features``), and fine-tuning a classifier (``finetune``).

May import the base modules, :mod:`segfromxai.ops` and :mod:`segfromxai.io`.
"""
