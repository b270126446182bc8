"""Datasets and datamodules: MNIST quickstart, ImageNet folders and webdataset shards, and (image, caption) pairs
(MNIST template captions, caption folders, caption shards) for text-to-image."""
