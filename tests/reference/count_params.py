"""Counts the parameters diffusers gives UNet configs, built on the meta device (no memory).

usage: count_params.py CONFIG.json [CONFIG.json ...]   -> one JSON list of counts
"""
import json, sys
import torch
from diffusers import UNet2DConditionModel

counts = []
for path in sys.argv[1:]:
    cfg = json.load(open(path))
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(cfg)
    counts.append(sum(p.numel() for p in model.parameters()))
print(json.dumps(counts))
