"""Datasets and datamodules (MNIST quickstart; ImageNet and webdataset shards plug into the same interface)."""
