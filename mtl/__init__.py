"""Meta-Transfer Learning for few-shot image classification (Sun et al., CVPR 2019).

The library behind the Snakemake workflow: datasets to HDF5, scale/shift backbones,
pre-training, meta-training with the hard-task meta-batch, batched meta-test and results.
It knows nothing of Snakemake and can be used on its own.
"""
__version__ = "0.1.0"

#: Loaded on first use, so that ``import mtl`` stays free of torch (the Snakefile imports mtl).
_LAZY = {"load_model": "mtl.predict", "load_models": "mtl.predict"}


def __getattr__(name: str):
    """``mtl.load_model(path)`` / ``mtl.load_models(paths)``: see :mod:`mtl.predict`."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtl' has no attribute {name!r}")
