"""Transfer of a context-encoder-pretrained encoder to the paper's benchmarks (§5.2, Table 2).

One folder per target: ``classification`` (VOC2007, fine-tune and linear probe), ``torchvision_det`` (Faster
R-CNN) and ``torchvision_seg`` (FCN) run on any machine; ``detectron2`` and ``mmseg`` adapt the same encoder to
those libraries, which are imported only inside their folders. ``common`` holds what they share: checkpoint
loading with preprocessing, where to tap a backbone (``features``), the flag vocabulary and exit codes (``cli``),
the one accelerate fine-tuning engine (``engine``), the VOCdevkit dataset layer and the VOC metrics.
``imagefolder`` answers "did my pretraining help?" on any ``class_name/*.jpg`` folders (fine-tune, linear probe,
kNN); ``study`` is the feature study behind ``benchmarks/table2.py``.
"""
