"""VOC2007 classification transfer (§5.2): fine-tuning with fresh fully-connected layers, and a linear probe."""
