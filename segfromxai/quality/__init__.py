"""How good are the masks and maps: mask metrics (``metrics``), evaluation against ground truth or a student
(``evaluate``), the recipe comparison (``compare``), faithfulness of maps (``faithfulness``, ``gae``), the HTML
report and its charts (``report``, ``plots``) and the synthetic benchmark (``synth``).

May import everything below it, up to :mod:`segfromxai.run`; never the student or the CLI.
"""
