"""The student segmenter, trained on a run's pseudo-labels and labelling images at forward-pass cost, along its data
flow (each module imports only those above it in this list):

- :mod:`.masks`: a student's probabilities to masks (the soft maps, ``SOFT_MAPS``, and the boundary stage on them);
- :mod:`.heads`: the heads (``HEADS``, with torchvision's segmenters), starting a head from local weights
  (``load_head_weights``), a head's probabilities of token grids;
- :mod:`.config`: ``StudentConfig``, every option of a student, and the settings digest that keys its caches;
- :mod:`.tokens`: the frozen trunk and its token cache (in memory and on disk);
- :mod:`.data`: the training run's folder, COCO file and annotations, and the train / predict split;
- :mod:`.targets`: training targets from the pseudo-labels and, for self-training, from the previous student;
- :mod:`.train`: training a head, its checkpoints, and finished rounds (saved, reloaded, ``load_student``);
- :mod:`.predict`: a trained head's masks as COCO records (``Labeller``, ``predict``);
- :mod:`.label`: a trained student labelling a folder as ``run`` does (``open_student``, ``label_folder``);
- :mod:`.job`: the ``student`` job that ties them (``train_student``), its scores and report.

May import everything below it; only the CLI and the catalog import it.
"""
