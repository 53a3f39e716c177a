"""SDXL students against diffusers, for tests/sdxl.rs: one run for every preset.

usage: sdxl_students.py STUDENTS_DIR CONFIGS_JSON OUT_DIR

STUDENTS_DIR/<preset>/ are StableDiffusionXLPipeline folders written by `sdkd prune --format
pipeline` from a tiny teacher with SDXL-base's block structure. For each, fails unless
UNet2DConditionModel loads unet/ with no missing, unexpected or mis-shaped keys and
StableDiffusionXLPipeline.from_pretrained loads the folder without a warning about keys; then
saves fixed inputs and the UNet's prediction as OUT_DIR/<preset>.safetensors.

CONFIGS_JSON maps a preset to the UNet config sdkd writes for it on SDXL-base's real config; each
is built by diffusers on the meta device and its parameter count
and tensor names go to OUT_DIR/full.json as {preset: {"params": n, "names": [...]}}.
"""
import io
import json
import logging
import os
import sys

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import logging as dlogging
from safetensors.torch import save_file

students_dir, configs_json, out_dir = sys.argv[1:4]

# diffusers and transformers report unused or missing weights as warnings on their loggers
captured = io.StringIO()
handler = logging.StreamHandler(captured)
for name in ("diffusers", "transformers"):
    logging.getLogger(name).addHandler(handler)
dlogging.set_verbosity_warning()

gen = torch.Generator().manual_seed(7)
shared = {}  # the parts every student folder shares with its teacher, loaded once
for preset in sorted(os.listdir(students_dir)):
    d = os.path.join(students_dir, preset)
    unet, info = UNet2DConditionModel.from_pretrained(os.path.join(d, "unet"), output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{preset}: {key}: {info[key]}"
    captured.truncate(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(d, **shared)
    shared = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    log = captured.getvalue().lower()
    for word in ("missing", "unexpected", "not used", "newly initialized", "not initialized"):
        assert word not in log, f"{preset}: loading the pipeline warned: {captured.getvalue()}"
    unet = pipe.unet.eval()
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([10, 900], dtype=torch.int64)
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=gen)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, generator=gen),
             "time_ids": torch.tensor([[96.0, 80.0, 0.0, 8.0, 96.0, 96.0], [1024.0, 768.0, 16.0, 0.0, 512.0, 512.0]])}
    with torch.no_grad():
        out = unet(sample, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    save_file({"sample": sample, "timesteps": t, "context": ctx, "out": out, **added}, os.path.join(out_dir, f"{preset}.safetensors"))

full = {}
for preset, cfg in json.load(open(configs_json)).items():
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(cfg)
    full[preset] = {"params": sum(p.numel() for p in model.parameters()), "names": sorted(model.state_dict())}
json.dump(full, open(os.path.join(out_dir, "full.json"), "w"))
