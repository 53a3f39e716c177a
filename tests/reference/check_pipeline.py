"""Loads a pipeline folder with diffusers' StableDiffusionPipeline and checks its UNet.

usage: check_pipeline.py PIPELINE_DIR [WEIGHTS.safetensors]

Fails unless the folder loads with no missing or unexpected UNet keys, and (when WEIGHTS is given)
every UNet tensor equals the one of that name in WEIGHTS. Prints {"unet_params": N} as JSON.
"""
import json, sys
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

path = sys.argv[1]
pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
_, info = UNet2DConditionModel.from_pretrained(path, subfolder="unet", output_loading_info=True)
for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info.get(key), f"{key}: {info[key]}"
state = pipe.unet.state_dict()
if len(sys.argv) > 2:
    want = load_file(sys.argv[2])
    assert set(want) == set(state), "same tensor names"
    for k, v in want.items():
        assert torch.equal(state[k], v.to(state[k].dtype)), k
print(json.dumps({"unet_params": sum(p.numel() for p in pipe.unet.parameters())}))
