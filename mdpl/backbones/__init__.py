"""Backbones: ViLT (docs/methods.md §2) and CLIP (§5)."""
from mdpl.backbones.vilt import BackboneOutput, ViLTBackbone
from mdpl.backbones.vilt_weights import LoadReport, load_reference_finetuned, load_vilt_checkpoint

__all__ = ["ViLTBackbone", "BackboneOutput", "LoadReport", "load_vilt_checkpoint", "load_reference_finetuned"]
