"""Models: the one classifier, `build_classifier(config)`, and checkpoint loading."""
from mdpl.models.classifier import PromptedClassifier, build_classifier

__all__ = ["PromptedClassifier", "build_classifier"]
