"""Run by tests/data/test_features.py in every process of a launch: prepare_for_training on a data folder, as
training's processes call it, then a line saying how many rows this process encoded.    _cache_launch.py DATA_DIR"""
import os
import sys

import helpers.data.features as features_module
from helpers.profile import get_profile

rows = []
real = features_module.encode_batch
features_module.encode_batch = lambda pipe, images, texts, resolution: rows.append(len(texts)) or real(
    pipe, images, texts, resolution)
features_module.prepare_for_training(get_profile("tiny", announce=False), sys.argv[1], progress=False, announce=False)
print(f"process {os.environ['RANK']} encoded {sum(rows)} rows", flush=True)
