"""Reads a TensorBoard log folder with TensorBoard's own EventAccumulator and prints its scalars
and images as JSON (tests/trainkit.rs). Usage: trainkit_tb_read.py <log dir>"""
import io
import json
import sys

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0})
acc.Reload()
tags = acc.Tags()
out = {"scalars": {}, "images": {}}
for tag in tags["scalars"]:
    out["scalars"][tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
for tag in tags["images"]:
    out["images"][tag] = []
    for e in acc.Images(tag):
        img = Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")
        out["images"][tag].append({
            "step": e.step, "width": e.width, "height": e.height,
            "pixels": np.asarray(img).reshape(-1).tolist(),
        })
print(json.dumps(out))
