"""SDXL students against diffusers, for tests/sdxl.rs: one run for every preset.

usage: sdxl_students.py STUDENTS_DIR CONFIGS_JSON OUT_DIR TEACHER_UNET_DIR

STUDENTS_DIR/<preset>/ are StableDiffusionXLPipeline folders written by `sdkd prune --format
pipeline` from a tiny teacher with SDXL-base's block structure. For each, fails unless
UNet2DConditionModel loads unet/ with no missing, unexpected or mis-shaped keys and
StableDiffusionXLPipeline.from_pretrained loads the folder without a warning about keys; then
saves fixed inputs and the UNet's prediction as OUT_DIR/<preset>.safetensors.

CONFIGS_JSON maps a preset to the UNet config sdkd writes for it on SDXL-base's real config; each
is built by diffusers on the meta device and its parameter count
and tensor names go to OUT_DIR/full.json as {preset: {"params": n, "names": [...]}}.

Feature KD losses on fixed inputs, teacher TEACHER_UNET_DIR, each feature taken by a forward hook
on the diffusers module (tuple outputs: their first element), written as
OUT_DIR/loss-<case>.safetensors (inputs, `target`, and `task`, `output_kd`, `features`, `total`):
  ssd_1b: SSD-1B's step (its released distill_sdxl.py, sub_block hooks): every down/up resnet and
    attention output against the teacher's of the same name, the teacher's whole mid block against
    the student's single mid resnet (26 MSEs); loss = task + 0.5 output KD + 0.5 sum.
  koala_1b: the self-attention (attn1) output of every student transformer layer against the
    teacher layer it keeps (down resnet 0, up resnets 0 and 2, first layers), each MSE divided by
    the teacher feature's mean square (LAPTOP-Diff); the same weights.
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

students_dir, configs_json, out_dir, teacher_dir = sys.argv[1:5]

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


def hooked(model, names):
    feats = {}
    for n in names:
        def keep(_m, _i, out, n=n):
            feats[n] = out[0] if isinstance(out, tuple) else out
        model.get_submodule(n).register_forward_hook(keep)
    return feats


def ssd_pairs(student):
    pairs = []
    for side, blocks in (("down_blocks", student.down_blocks), ("up_blocks", student.up_blocks)):
        for i, b in enumerate(blocks):
            for kind in ("resnets", "attentions"):
                for j in range(len(getattr(b, kind, []) or [])):
                    pairs.append((f"{side}.{i}.{kind}.{j}", f"{side}.{i}.{kind}.{j}"))
    return pairs + [("mid_block", "mid_block.resnets.0")]


def koala_pairs(student):
    pairs = []
    up_source = [0, 2]
    for side, blocks in (("down_blocks", student.down_blocks), ("up_blocks", student.up_blocks), ("mid_block", [student.mid_block])):
        for i, b in enumerate(blocks):
            for j, attn in enumerate(getattr(b, "attentions", []) or []):
                tj = up_source[j] if side == "up_blocks" else j
                prefix = "mid_block" if side == "mid_block" else f"{side}.{i}"
                for l in range(len(attn.transformer_blocks)):
                    pairs.append((f"{prefix}.attentions.{tj}.transformer_blocks.{l}.attn1", f"{prefix}.attentions.{j}.transformer_blocks.{l}.attn1"))
    return pairs


teacher = UNet2DConditionModel.from_pretrained(teacher_dir).eval()
for case, pairs_of, normalize in (("ssd_1b", ssd_pairs, False), ("koala_1b", koala_pairs, True)):
    student = UNet2DConditionModel.from_pretrained(os.path.join(students_dir, case, "unet")).eval()
    pairs = pairs_of(student)
    t_feats, s_feats = hooked(teacher, [t for t, _ in pairs]), hooked(student, [s for _, s in pairs])
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([10, 900], dtype=torch.int64)
    ctx = torch.randn(2, 7, student.config.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(2, 12, generator=gen),
             "time_ids": torch.tensor([[96.0, 80.0, 0.0, 8.0, 96.0, 96.0], [1024.0, 768.0, 16.0, 0.0, 512.0, 512.0]])}
    target = torch.randn(2, 4, 16, 16, generator=gen)
    with torch.no_grad():
        teacher_pred = teacher(sample, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        pred = student(sample, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    mse = torch.nn.functional.mse_loss
    features = torch.zeros((), dtype=torch.float64)
    for tn, sn in pairs:
        term = mse(s_feats[sn].float(), t_feats[tn].float())
        if normalize:
            term = term / t_feats[tn].float().pow(2).mean()
        features = features + term.double()
    task, kd = mse(pred.float(), target.float()), mse(pred.float(), teacher_pred.float())
    total = task.double() + 0.5 * kd.double() + 0.5 * features
    save_file({"sample": sample, "timesteps": t, "context": ctx, "target": target, **added,
               "task": task.reshape(1), "output_kd": kd.reshape(1), "features": features.reshape(1), "total": total.reshape(1),
               "pairs": torch.tensor([len(pairs)])}, os.path.join(out_dir, f"loss-{case}.safetensors"))
