"""Models: `build_classifier(config)`."""
from mdpl.models.classifier import MultimodalClassifier, build_classifier
from mdpl.models.heads import build_vilt_head, head_attribute

__all__ = ["MultimodalClassifier", "build_classifier", "build_vilt_head", "head_attribute"]
