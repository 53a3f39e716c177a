"""BK-SDM's generation loop in diffusers, for tests/eval_generate.rs: one CPU torch.Generator
seeded SEED, drawn consecutively for the whole run, one prompt per pipeline call (BK-SDM's
generate.py at batch size 1), PNDM from the pipeline's scheduler config, no negative prompt.

usage: eval_generate_reference.py PIPELINE PROMPTS_JSON OUT_DIR SEED STEPS RESOLUTION

Writes OUT_DIR/<k:06d>.png for each prompt k of PROMPTS_JSON (a list of strings), its copy
resized as BK-SDM scores it (`img.resize((256, 256), Image.BICUBIC)`) as OUT_DIR/256/<k:06d>.png, and
OUT_DIR/randn.json: whether torch's CPU randn of (B, 4, h, w) equals B consecutive (1, 4, h, w)
draws from one generator, for several latent sizes (equal when 4·h·w is a multiple of 16, the
vectorised normal kernel's chunk, or below 16 elements, the scalar path).
"""
import json
import os
import sys

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

torch.set_num_threads(1)
model, prompts_file, out, seed, steps, res = sys.argv[1:7]
seed, steps, res = int(seed), int(steps), int(res)
os.makedirs(out, exist_ok=True)
with open(prompts_file) as f:
    prompts = json.load(f)

pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
generator = torch.Generator("cpu").manual_seed(seed)
for k, prompt in enumerate(prompts):
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=res, width=res,
                 generator=generator, output_type="pil").images[0]
    image.save(os.path.join(out, f"{k:06d}.png"))
    os.makedirs(os.path.join(out, "256"), exist_ok=True)
    image.resize((256, 256), Image.BICUBIC).save(os.path.join(out, "256", f"{k:06d}.png"))

randn = {}
for h, w in [(64, 64), (16, 16), (8, 8), (1, 1), (3, 3), (5, 7)]:
    g = torch.Generator().manual_seed(seed)
    batched = torch.randn((3, 4, h, w), generator=g)
    g = torch.Generator().manual_seed(seed)
    consecutive = torch.cat([torch.randn((1, 4, h, w), generator=g) for _ in range(3)])
    randn[f"{h}x{w}"] = bool(torch.equal(batched, consecutive))
with open(os.path.join(out, "randn.json"), "w") as f:
    json.dump(randn, f)
print(json.dumps(randn))
