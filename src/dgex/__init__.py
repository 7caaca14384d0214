"""dgex: a reproducible reimplementation of D-GEX (Chen et al., Bioinformatics 2016).

Landmark genes (943, as measured by L1000) -> target genes (9,520) with a
multi-task feed-forward network, run as a Snakemake grid of Lightning trainings.
"""

__version__ = "0.1.0"

#: Version of the on-disk processed-dataset layout written by `dgex preprocess`.
DATASET_FORMAT = 1
