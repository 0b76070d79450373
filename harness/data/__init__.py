"""Data: the image data sets, the generated quickstart set, the embedded backbones' weights,
and the cache folder everything generated lives in.

- ``harness.data.images``: image data sets (ImageNet folders, list files), preprocessing,
  bad-image handling (``build_dataset``);
- ``harness.data.quickstart``: the embedded quickstart data set, generated offline;
- ``harness.data.embedded``: training the embedded backbones on it (cached weights);
- ``harness.data.models``: loading a backbone with its weights resolved (``load_backbone``);
- ``harness.data.cache``: where generated things go, atomic writes, locks, and the check
  that results outlive a Ray job.
"""
