"""The student segmenter, trained on a run's pseudo-labels and labelling images at forward-pass cost, along its data
flow: the run's masks and images in, trunk tokens, heads, training rounds, predictions, and the job that ties them.

May import everything below it; only the CLI and the catalog import it.
"""
