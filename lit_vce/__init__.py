"""lit_vce: visual counterfactual explanations with classifier-guided diffusion, benchmarked at scale.

Entry points: the ``lit-vce`` command (``lit_vce.cli``), :class:`lit_vce.lightning.VCEModule`,
:class:`lit_vce.data.VCEDataModule`, :func:`lit_vce.classifiers.load_classifier`, and the
method registry ``lit_vce.registry.METHODS``.
"""

__version__ = "0.1.0"
