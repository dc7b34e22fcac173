"""detectron2 transfer: Fast R-CNN (precomputed proposals, as in the paper) and Faster R-CNN on VOC2007.

``convert`` and ``proposals`` need no detectron2; ``backbone`` and ``train_net`` import it (install it from source:
it is on no package index)::

    python -m transfer.detectron2.train_net --config-file transfer/detectron2/configs/fast_rcnn_alexnet_voc07.yaml \\
        --model DIR_OR_HUB_ID --data-root VOCdevkit --proposals-dir selective_search
"""
