"""The stages after the explain pass, each a family of pure functions in a registry: fusion of the maps
(``fusion``: FUSIONS), thresholds (``threshold``: THRESHOLDS), refiners that cut on feature tokens (``refine``:
REFINERS) and the boundary stage that snaps the outline to the image's edges (``boundary``: BOUNDARIES).

Arrays in, arrays out; no I/O. May import the base modules, :mod:`segfromxai.ops`, :mod:`segfromxai.io`,
:mod:`segfromxai.models` and :mod:`segfromxai.explainers`.
"""
