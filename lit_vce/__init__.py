"""lit_vce: visual counterfactual explanations with classifier-guided diffusion, benchmarked at scale.

Entry points: :func:`lit_vce.explain` (the Python API; :func:`lit_vce.load_method` builds
its methods from names or configs), the ``lit-vce`` command
(``lit_vce.cli``), :class:`lit_vce.lightning.VCEModule`,
:class:`lit_vce.data.VCEDataModule`, :func:`lit_vce.classifiers.load_classifier`, and the
method registry ``lit_vce.registry.METHODS``.
"""

import os as _os

__version__ = "0.1.0"
__all__ = ["explain", "Explanation", "load_method", "__version__"]

# LIT_VCE_OFFLINE=1 also puts the Hugging Face hub offline (its cache is still read);
# huggingface_hub reads the variable when it is first imported, so set it here
if _os.environ.get("LIT_VCE_OFFLINE", "0") not in ("", "0"):
    _os.environ["HF_HUB_OFFLINE"] = "1"
del _os


def __getattr__(name):  # `from lit_vce import explain` without importing torch on `import lit_vce`
    if name in ("explain", "Explanation", "load_method"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'lit_vce' has no attribute {name!r}")
