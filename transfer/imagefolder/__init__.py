"""ImageFolder classification transfer: fine-tuning, linear probe and kNN on any ``class_name/*.jpg`` folders.

    python -m transfer.imagefolder --model SRC --train DIR --val DIR --mode finetune|linear|knn --output-dir D
"""

from .train import ImageFolderConfig, run

__all__ = ["ImageFolderConfig", "run"]
