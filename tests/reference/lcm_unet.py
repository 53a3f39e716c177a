"""A UNet with a guidance embedding (`time_cond_proj_dim`) made from another, as diffusers' latent
consistency distillation scripts make their student, for tests/generate.rs and tests/sdxl.rs.

usage: lcm_unet.py SRC_UNET_DIR OUT_DIR [DIM] [SEED]
       lcm_unet.py check PIPELINE_DIR OUT_PNG STEPS SEED GUIDANCE [SIZE]

  unet = UNet2DConditionModel.from_config(src.config, time_cond_proj_dim=DIM)   # DIM default 32
  unet.load_state_dict(src.state_dict(), strict=False)   # all but time_embedding.cond_proj
  unet.save_pretrained(OUT_DIR)

`time_embedding.cond_proj` keeps PyTorch's default Linear init (as the scripts leave it), drawn
after torch.manual_seed(SEED) (default 0).

`check` loads PIPELINE_DIR (an exported LCM student) with StableDiffusionPipeline.from_pretrained
(StableDiffusionXLPipeline's for an SDXL folder, by its model_index.json) as it is, asserts that its scheduler is an LCMScheduler and its UNet has time_cond_proj_dim, and
saves the SIZE×SIZE (default 32) image of "a red cube on a blue table" at STEPS steps, GUIDANCE, generator
torch.Generator("cpu").manual_seed(SEED) to OUT_PNG, and beside it OUT_PNG.json: the scheduler
config's `original_inference_steps` and `timestep_scaling` and the timesteps it sampled at.
"""
import json
import os
import sys

import torch
from diffusers import UNet2DConditionModel


def check(pipeline, out_png, steps, seed, guidance, size=32):
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    with open(os.path.join(pipeline, "model_index.json")) as f:
        xl = json.load(f)["_class_name"] == "StableDiffusionXLPipeline"
    if xl:
        pipe = StableDiffusionXLPipeline.from_pretrained(pipeline)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None, requires_safety_checker=False)
    assert isinstance(pipe.scheduler, LCMScheduler), type(pipe.scheduler)
    assert pipe.unet.config.time_cond_proj_dim is not None
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red cube on a blue table", num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                 generator=torch.Generator("cpu").manual_seed(seed), output_type="pil").images[0]
    image.save(out_png)
    c = pipe.scheduler.config
    with open(out_png + ".json", "w") as f:
        json.dump({"original_inference_steps": c.original_inference_steps, "timestep_scaling": c.timestep_scaling,
                   "timesteps": pipe.scheduler.timesteps.tolist()}, f)


def main():
    torch.set_num_threads(1)
    if sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), *map(int, sys.argv[7:8]))
        return
    src, out = sys.argv[1], sys.argv[2]
    dim = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    teacher = UNet2DConditionModel.from_pretrained(src)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=dim)
    missing, unexpected = unet.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    unet.save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    main()
