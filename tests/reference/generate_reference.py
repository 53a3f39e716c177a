"""Text-to-image references from diffusers' StableDiffusionPipeline, for tests/generate.rs.

usage: generate_reference.py CASES_JSON

CASES_JSON is a list of cases, each
  {"model": pipeline dir, "unet": UNet folder or null, "prompt": str, "negative_prompt": str or null,
   "scheduler": "ddpm" | "ddim" | "euler" | "euler_a" | "dpmpp_2m" | "unipc" | "pndm" | "lcm", "steps": int,
   "guidance_scale": float, "seed": int, "width": int, "height": int, "samples": int,
   "out": path prefix, "loras": optional [[LoRA file, scale], ...]}
and each writes <out>-<i>.png for i < samples: the PIL images of

  pipe = StableDiffusionPipeline.from_pretrained(model, [unet=UNet2DConditionModel.from_pretrained(unet),]
                                                 safety_checker=None, requires_safety_checker=False)
  for i, (file, scale) in enumerate(loras):   # fused, as `sdkd generate --lora FILE:SCALE` fuses
      pipe.load_lora_weights(file, adapter_name=f"l{i}"); pipe.fuse_lora(lora_scale=scale, adapter_names=[f"l{i}"])
  pipe.scheduler = XScheduler.from_config(pipe.scheduler.config)
  pipe(prompt, negative_prompt=..., num_inference_steps=steps, guidance_scale=g, height=h, width=w,
       num_images_per_prompt=samples, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
"""
import json
import os
import sys

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel,
                       UniPCMultistepScheduler)

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "pndm": PNDMScheduler,
    "lcm": LCMScheduler,
}


def main():
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    pipes = {}
    for case in cases:
        loras = [tuple(lora) for lora in case.get("loras") or []]
        key = (case["model"], case.get("unet"), tuple(loras))
        if key not in pipes:
            extra = {}
            if case.get("unet"):
                extra["unet"] = UNet2DConditionModel.from_pretrained(case["unet"])
            pipe = StableDiffusionPipeline.from_pretrained(case["model"], safety_checker=None,
                                                           requires_safety_checker=False, **extra)
            pipe.set_progress_bar_config(disable=True)
            for i, (file, scale) in enumerate(loras):
                pipe.load_lora_weights(os.path.dirname(file), weight_name=os.path.basename(file), adapter_name=f"l{i}")
                pipe.fuse_lora(lora_scale=scale, adapter_names=[f"l{i}"])
            pipes[key] = (pipe, pipe.scheduler.config)
        pipe, base_config = pipes[key]
        pipe.scheduler = SCHEDULERS[case["scheduler"]].from_config(base_config)
        images = pipe(case["prompt"], negative_prompt=case.get("negative_prompt"),
                      num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"],
                      height=case["height"], width=case["width"], num_images_per_prompt=case["samples"],
                      generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="pil").images
        for i, image in enumerate(images):
            image.save(f"{case['out']}-{i}.png")


if __name__ == "__main__":
    main()
