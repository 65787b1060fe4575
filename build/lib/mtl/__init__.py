"""Meta-Transfer Learning for few-shot image classification (Sun et al., CVPR 2019).

The library behind the Snakemake workflow: datasets to HDF5, scale/shift backbones,
pre-training, meta-training with the hard-task meta-batch, batched meta-test and results.
It knows nothing of Snakemake and can be used on its own.
"""
__version__ = "0.1.0"
