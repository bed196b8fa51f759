"""Pure array operations: instance masks and their cleaning (``masks``), graph cuts (``graphcut``), the cut's rules
(``cutrules``) and resizing (``resize``).

NumPy (and OpenCV/SciPy) in, arrays out: no I/O, no models. Used by the stages and by io. May import only the
package's base modules (:mod:`segfromxai.params`, :mod:`segfromxai.fileio`, :mod:`segfromxai.registry`).
"""
