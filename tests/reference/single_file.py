"""Single-file (CompVis/LDM layout) references for tests/single_file.rs.

usage:
  single_file.py make OUT_DIR --family sd1|sd2
      OUT_DIR/folder/: a tiny diffusers pipeline whose hyper-parameters a single file can carry
      (norm groups 32 as LDM hard-codes them, text encoder heads of 64 channels; SD-2: linear
      projections, v-prediction, upcast attention, 16-channel UNet heads), every weight perturbed;
      OUT_DIR/model.safetensors: the same weights in LDM names, converted here by the tables of
      diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py (ported: they are not in
      the wheel), so for SD's layout only (4 stages, 2 layers, 3 cross-attention stages), with the
      extras real files carry (SD-1: text encoder position_ids and model_ema.* EMA weights that
      differ from the UNet's; SD-2: a 24th-like last OpenCLIP layer the model does not use,
      text_projection, logit_scale). SD-2 gets OUT_DIR/model.yaml (parameterization "v",
      num_head_channels 16), as the official v-models ship one.
      OUT_DIR/evil.ckpt: a torch.save zip whose pickle calls os.system (touch OUT_DIR/PWNED).
      OUT_DIR/model.ckpt: the single file as a Lightning-style torch.save({"state_dict": ...}).
      OUT_DIR/sdxl.safetensors: keys of an SDXL file.
  single_file.py load FILE CONFIG_DIR OUT_DIR
      StableDiffusionPipeline.from_single_file(FILE, config=CONFIG_DIR).save_pretrained(OUT_DIR)
  single_file.py generate CASES_JSON
      [{"file", "config", "prompt", "steps", "seed", "size", "out"}]: the DDIM image of
      from_single_file(file, config=config), written as PNG
  single_file.py unet FILE CONFIG_DIR OUT
      UNet2DConditionModel.from_single_file(FILE, config=CONFIG_DIR)'s state dict as safetensors at
      OUT, or {"error": message} in OUT.json when diffusers cannot load it
  single_file.py reload FOLDER OUT_DIR
      StableDiffusionPipeline.from_pretrained(FOLDER).save_pretrained(OUT_DIR)
  single_file.py jobs JOBS_JSON
      several of the above in one process ([["make", OUT_DIR, "sd1"], ["load", ...], ...]), which
      saves the seconds each start of diffusers costs
"""
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# --- the tables of diffusers' convert_diffusers_to_original_stable_diffusion.py -------------------
unet_conversion_map = [
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
]
unet_conversion_map_resnet = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
unet_conversion_map_layer = []
for i in range(4):
    for j in range(2):
        unet_conversion_map_layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
        if i < 3:
            unet_conversion_map_layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
    for j in range(3):
        unet_conversion_map_layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
        if i > 0:
            unet_conversion_map_layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
    if i < 3:
        unet_conversion_map_layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        unet_conversion_map_layer.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
unet_conversion_map_layer.append(("middle_block.1.", "mid_block.attentions.0."))
for j in range(2):
    unet_conversion_map_layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))


def convert_unet_state_dict(sd):
    mapping = {k: k for k in sd}
    for sd_name, hf_name in unet_conversion_map:
        mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in unet_conversion_map_resnet:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    for k, v in mapping.items():
        for sd_part, hf_part in unet_conversion_map_layer:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    return {v: sd[k] for k, v in mapping.items()}


vae_conversion_map = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
for i in range(4):
    for j in range(2):
        vae_conversion_map.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
    if i < 3:
        vae_conversion_map.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
        vae_conversion_map.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    for j in range(3):
        vae_conversion_map.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
for i in range(2):
    vae_conversion_map.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
vae_conversion_map_attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]


def convert_vae_state_dict(sd):
    mapping = {k: k for k in sd}
    for k, v in mapping.items():
        for sd_part, hf_part in vae_conversion_map:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    for k, v in mapping.items():
        if "attentions" in k:
            for sd_part, hf_part in vae_conversion_map_attn:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    new = {v: sd[k] for k, v in mapping.items()}
    for k, v in new.items():
        for w in ["q", "k", "v", "proj_out"]:
            if f"mid.attn_1.{w}.weight" in k:
                new[k] = v.reshape(*v.shape, 1, 1)  # the original files store them as 1x1 convs
    return new


textenc_conversion_lst = [
    ("resblocks.", "text_model.encoder.layers."),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."),
    (".c_proj.", ".fc2."),
    (".attn", ".self_attn"),
    ("ln_final.", "transformer.text_model.final_layer_norm."),
    ("token_embedding.weight", "transformer.text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "transformer.text_model.embeddings.position_embedding.weight"),
]
protected = {re.escape(x[1]): x[0] for x in textenc_conversion_lst}
textenc_pattern = re.compile("|".join(protected.keys()))
code2idx = {"q": 0, "k": 1, "v": 2}


def convert_text_enc_state_dict_v20(sd):
    new, capture_w, capture_b = {}, {}, {}
    for k, v in sd.items():
        if k.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            prefix = k[: -len(".q_proj.weight")]
            capture_w.setdefault(prefix, [None] * 3)[code2idx[k[-len("q_proj.weight")]]] = v
            continue
        if k.endswith(("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")):
            prefix = k[: -len(".q_proj.bias")]
            capture_b.setdefault(prefix, [None] * 3)[code2idx[k[-len("q_proj.bias")]]] = v
            continue
        new[textenc_pattern.sub(lambda m: protected[re.escape(m.group(0))], k)] = v
    for prefix, ts in capture_w.items():
        new[textenc_pattern.sub(lambda m: protected[re.escape(m.group(0))], prefix) + ".in_proj_weight"] = torch.cat(ts)
    for prefix, ts in capture_b.items():
        new[textenc_pattern.sub(lambda m: protected[re.escape(m.group(0))], prefix) + ".in_proj_bias"] = torch.cat(ts)
    return new
# -------------------------------------------------------------------------------------------------


def perturb(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def make(out, family):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import clip_vocab

    sd2 = family == "sd2"
    torch.manual_seed(2 if sd2 else 1)
    gen = torch.Generator().manual_seed(7)
    hidden = 128
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=hidden, attention_head_dim=[2, 2, 4, 4] if sd2 else 8, norm_num_groups=32,
        use_linear_projection=sd2, upcast_attention=sd2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=64, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    # SD-2's text encoder in diffusers is OpenCLIP without its last layer; the file keeps one more.
    layers = 2
    te_config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=256, num_hidden_layers=layers + (1 if sd2 else 0),
                               num_attention_heads=hidden // 64, max_position_embeddings=77,
                               hidden_act="gelu" if sd2 else "quick_gelu")
    full_te = CLIPTextModel(te_config)
    for m in (unet, vae, full_te):
        perturb(m, gen)
    te_config.num_hidden_layers = layers
    text_encoder = CLIPTextModel(te_config)
    missing, unexpected = text_encoder.load_state_dict(full_te.state_dict(), strict=False)
    assert not missing, missing
    tmp = os.path.join(out, "tok")
    clip_vocab.write_tokenizer(tmp, pad_token="!" if sd2 else clip_vocab.EOS)
    tokenizer = CLIPTokenizer.from_pretrained(tmp)
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "reference", "sd15_scheduler_config.json")) as f:
        sched_file = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    sched = dict(sched_file)
    sched.pop("clip_sample", None)
    scheduler = PNDMScheduler(**sched, prediction_type="v_prediction" if sd2 else "epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(out, "folder"), safe_serialization=True)
    # SD-1.5's scheduler_config.json as published (PNDMScheduler refuses its clip_sample key, but the
    # file carries it and DDIMScheduler.from_config reads it)
    with open(os.path.join(out, "folder", "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "PNDMScheduler", **sched_file, "prediction_type": "v_prediction" if sd2 else "epsilon"}, f, indent=2)

    sd = {"model.diffusion_model." + k: v for k, v in convert_unet_state_dict(unet.state_dict()).items()}
    sd.update({"first_stage_model." + k: v for k, v in convert_vae_state_dict(vae.state_dict()).items()})
    # the names SD files carry (transformers 5 saves CLIPTextModel without the text_model. level)
    te_sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in full_te.state_dict().items()}
    if sd2:
        # as the script does: "transformer." first, so that the final layer norm's name can be knocked out
        te = convert_text_enc_state_dict_v20({"transformer." + k: v for k, v in te_sd.items()})
        sd.update({"cond_stage_model.model." + k: v for k, v in te.items()})
        sd["cond_stage_model.model.text_projection"] = torch.randn(hidden, hidden, generator=gen)
        sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
        with open(os.path.join(out, "model.yaml"), "w") as f:
            f.write("model:\n  params:\n    parameterization: \"v\"\n    unet_config:\n      params:\n        num_head_channels: 16\n")
    else:
        sd.update({"cond_stage_model.transformer." + k: v for k, v in te_sd.items()})
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        for k, v in list(sd.items()):
            if k.startswith("model.diffusion_model."):
                sd["model_ema." + k[len("model."):].replace(".", "")] = v + 1.0
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, os.path.join(out, "model.safetensors"))
    torch.save({"state_dict": sd, "global_step": 10}, os.path.join(out, "model.ckpt"))

    marker = os.path.join(out, "PWNED")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.ones(4)}, "evil": Evil()}, os.path.join(out, "evil.ckpt"))
    assert not os.path.exists(marker)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4),
               "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)},
              os.path.join(out, "sdxl.safetensors"))


def load(file, config, out):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(file, config=config, safety_checker=None, requires_safety_checker=False,
                                                    local_files_only=True)
    pipe.save_pretrained(out, safe_serialization=True)


def generate(cases_json):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    for case in json.load(open(cases_json)):
        pipe = StableDiffusionPipeline.from_single_file(case["file"], config=case["config"], safety_checker=None,
                                                        requires_safety_checker=False, local_files_only=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(case["prompt"], num_inference_steps=case["steps"], guidance_scale=7.5, height=case["size"], width=case["size"],
                     generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="pil").images[0]
        image.save(case["out"])


def unet(file, config, out):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    try:
        model = UNet2DConditionModel.from_single_file(file, config=config, local_files_only=True)
    except Exception as e:  # noqa: BLE001: the test records what diffusers says
        json.dump({"error": f"{type(e).__name__}: {e}"}, open(out + ".json", "w"))
        return
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)


def reload(folder, out):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False).save_pretrained(out)


def run(cmd, args):
    ops = {"make": make, "load": load, "generate": generate, "unet": unet, "reload": reload}
    if cmd not in ops:
        raise SystemExit(__doc__)
    ops[cmd](*args)


def main():
    torch.set_num_threads(1)
    cmd = sys.argv[1]
    if cmd == "jobs":
        for job in json.load(open(sys.argv[2])):
            run(job[0], job[1:])
    elif cmd == "make":
        make(sys.argv[2], sys.argv[sys.argv.index("--family") + 1])
    else:
        run(cmd, sys.argv[2:])


if __name__ == "__main__":
    main()
