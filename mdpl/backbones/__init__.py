"""Backbones: ViLT (docs/methods.md §2), CLIP (§5) and CoCa ViT-B/32 (§5b); each registers itself by name
(``registry.py``, ``backbone=<name>``), the ViLT classes are re-exported here."""
from mdpl.backbones.vilt import BackboneOutput, ViLTBackbone
from mdpl.backbones.vilt_weights import LoadReport, load_reference_finetuned, load_vilt_checkpoint

__all__ = ["ViLTBackbone", "BackboneOutput", "LoadReport", "load_vilt_checkpoint", "load_reference_finetuned"]
