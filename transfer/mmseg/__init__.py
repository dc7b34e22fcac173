"""mmsegmentation (1.x) transfer: FCN on VOC2012 with the SBD augmented set, mmseg's ``PascalVOCDataset`` and
``IoUMetric``. ``convert`` needs no mmseg; ``backbone`` and ``train`` import it.

    python -m transfer.mmseg.train --model DIR_OR_HUB_ID --data-root VOCdevkit --output-dir runs/mmseg
"""
