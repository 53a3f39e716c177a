"""Tiny random SDXL-shaped models and diffusers'/transformers' outputs on them, for tests/sdxl.rs.

usage: sdxl.py make OUT_DIR
       sdxl.py generate CASES_JSON
       sdxl.py kd_step PIPE STUDENT PAIRS_JSON OUT_FILE

`make` writes, every weight perturbed (default init hides bugs behind zero out-projections):

  OUT_DIR/unets/NAME/unet/ and OUT_DIR/unets/NAME/ref.safetensors, for four UNet2DConditionModels
  with `addition_embed_type: "text_time"`, linear projections and per-stage head counts:
    xl:    SDXL's layout (DownBlock2D then two cross-attention stages, layers_per_block 2, the mid
           block), transformer_layers_per_block [1, 2, 3]
    asym:  an asymmetric decoder as SSD-1B's: per-layer depths [1, [1, 2], [3]] with
           reverse_transformer_layers_per_block [[2, 1], [1, 1, 2], 1], layers_per_block
           [1, 2, 1], mid_block_type UNetMidBlock2D (one resnet), time_cond_proj_dim 16
    nomid: KOALA-700M-like: layers_per_block 1, mid_block_type null
    real:  SDXL-base's block structure exactly (transformer_layers_per_block [1, 2, 10], 70
           transformer blocks) at narrow widths: the teacher of the SDXL student presets
  ref.safetensors holds the inputs (sample, timesteps, context, text_embeds, time_ids and, for
  asym, timestep_cond), the prediction (`out`) and the block features (`feat.down_blocks.0`, ...).

  OUT_DIR/pipe/: a StableDiffusionXLPipeline folder (save_pretrained): text_encoder CLIPTextModel
  (quick_gelu, hidden 8), text_encoder_2 CLIPTextModelWithProjection (gelu, hidden 16,
  projection_dim 12, eos_token_id 2 as SDXL's config says), tokenizer (pad <|endoftext|>) and
  tokenizer_2 (pad "!") with the real CLIP vocabulary, the xl UNet's layout at sample_size 8,
  an AutoencoderKL (2x downscale, scaling_factor 0.13025), SDXL's EulerDiscreteScheduler config
  (leading spacing, steps_offset 1), force_zeros_for_empty_prompt true.
  OUT_DIR/encoders.safetensors: for the prompts of PROMPTS, each encoder's input_ids, its
  hidden_states[-2] (`te1.penultimate`, `te2.penultimate`) and text_embeds (`te2.text_embeds`),
  and the pipeline's encode_prompt outputs for PROMPTS[0] with and without a negative prompt.
  OUT_DIR/counts.json: transformers' and diffusers' parameter counts of SDXL-base's two text
  encoders and VAE built from their published configs on the meta device.

`sgm PIPE OUT_STEM` writes PIPE as an SGM/LDM single file, OUT_STEM.safetensors and OUT_STEM.ckpt
  (torch.save({"state_dict": ...})), by the tables of diffusers' scripts/convert_diffusers_to_original_sdxl.py
  (ported: they are not in the wheel; its VAE tables are written for the fixture's level count instead of
  a hard-coded 4, and `text_projection` is stored as SGM stores it, the transpose of the linear weight
  under the name `text_projection`, which is what diffusers' single_file_utils reads; the script leaves it
  as `text_projection.weight`).

`from_single_file FILE CONFIG OUT_DIR`: StableDiffusionXLPipeline.from_single_file(FILE, config=CONFIG),
  offline, saved with save_pretrained at OUT_DIR.

`single_files PIPE FILE OUT_STEM OUT_DIR`: `sgm PIPE OUT_STEM` and `from_single_file FILE PIPE OUT_DIR` in one
  process (diffusers' import costs seconds).

`kd_step PIPE STUDENT PAIRS_JSON OUT_FILE`: one knowledge-distillation step of sdkd's loss (task + output
  KD + the block feature MSEs of PAIRS_JSON, [[teacher module, student module], ...], weights 1) with
  PIPE's UNet as the teacher and the UNet folder STUDENT as the student, diffusers' classes in float32:
  DDPMScheduler.add_noise on PIPE's scheduler config, the added conditioning (pooled text embedding,
  time ids) given to both. OUT_FILE holds the inputs, the loss terms and the student's gradients
  (`grad.<param>`).

`generate` runs StableDiffusionXLPipeline on each case of CASES_JSON, a list of
  {"model", "unet": a UNet folder to use instead of the pipeline's, or null, "prompt", "negative_prompt" or null, "scheduler": euler | dpmpp_2m | unipc | ...,
   "steps", "guidance_scale", "guidance_rescale", "seed", "width", "height", "samples",
   "original_size" [h, w] or null, "crop" [y, x], "target_size" [h, w] or null, "out": prefix,
   "dtype": optional "bf16" | "fp16", the pipeline's torch_dtype,
   "loras": optional [[file, scale], ...], each loaded with load_lora_weights and fused with
   fuse_lora(lora_scale=scale), as `sdkd generate --lora FILE:SCALE` (generate_reference.py's field)}
and writes <out>-<i>.png.
"""
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_vocab  # noqa: E402

PROMPTS = ["a red cube on a blue table", "", "A photo of an astronaut riding a horse on mars, highly detailed"]
BASE = dict(in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=24, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8,
            block_out_channels=[16, 32, 64], attention_head_dim=[1, 2, 4],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
UNETS = {
    "xl": dict(BASE, layers_per_block=2, transformer_layers_per_block=[1, 2, 3]),
    "asym": dict(BASE, layers_per_block=[1, 2, 1], transformer_layers_per_block=[1, [1, 2], [3]],
                 reverse_transformer_layers_per_block=[[2, 1], [1, 1, 2], 1], mid_block_type="UNetMidBlock2D",
                 time_cond_proj_dim=16),
    "nomid": dict(BASE, layers_per_block=1, transformer_layers_per_block=[1, 1, 2], mid_block_type=None),
    "real": dict(BASE, layers_per_block=2, transformer_layers_per_block=[1, 2, 10]),
}
SCHEDULERS = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler", "lcm": "LCMScheduler",
}


def perturb(model, scale, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def unet_features(model, sample, t, ctx, added, cond):
    feats, hooks = {}, []

    def hook(name):
        def f(_m, _i, out):
            feats[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return f
    for i, b in enumerate(model.down_blocks):
        hooks.append(b.register_forward_hook(hook(f"down_blocks.{i}")))
    if model.mid_block is not None:
        hooks.append(model.mid_block.register_forward_hook(hook("mid_block")))
    for i, b in enumerate(model.up_blocks):
        hooks.append(b.register_forward_hook(hook(f"up_blocks.{i}")))
    with torch.no_grad():
        out = model(sample, t, encoder_hidden_states=ctx, added_cond_kwargs=added, timestep_cond=cond).sample
    for h in hooks:
        h.remove()
    return out, feats


def make_unets(out_dir, gen):
    from diffusers import UNet2DConditionModel

    for name, cfg in UNETS.items():
        model = UNet2DConditionModel(**cfg).eval()
        perturb(model, 0.05, gen)
        d = os.path.join(out_dir, "unets", name)
        model.save_pretrained(os.path.join(d, "unet"), safe_serialization=True)
        sample = torch.randn(2, 4, 12, 12, generator=gen)
        t = torch.tensor([10, 900], dtype=torch.int64)
        ctx = torch.randn(2, 7, cfg["cross_attention_dim"], generator=gen)
        added = {"text_embeds": torch.randn(2, 12, generator=gen),
                 "time_ids": torch.tensor([[96.0, 80.0, 0.0, 8.0, 96.0, 96.0], [1024.0, 768.0, 16.0, 0.0, 512.0, 512.0]])}
        cond = torch.randn(2, cfg["time_cond_proj_dim"], generator=gen) if cfg.get("time_cond_proj_dim") else None
        out, feats = unet_features(model, sample, t, ctx, added, cond)
        tensors = {"sample": sample, "timesteps": t, "context": ctx, "out": out, **added}
        if cond is not None:
            tensors["timestep_cond"] = cond
        tensors.update({f"feat.{k}": v.contiguous() for k, v in feats.items()})
        save_file(tensors, os.path.join(d, "ref.safetensors"))


def make_pipeline(out_dir, gen):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet = UNet2DConditionModel(sample_size=8, **UNETS["xl"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=16, scaling_factor=0.13025, force_upcast=True,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    te1 = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=8, intermediate_size=17, num_hidden_layers=3,
                                       num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=37,
                                                     num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77,
                                                     hidden_act="gelu", projection_dim=12, bos_token_id=0, eos_token_id=2,
                                                     pad_token_id=1))
    for model in (unet, vae, te1, te2):
        perturb(model, 0.05, gen)
    with tempfile.TemporaryDirectory() as tmp:
        clip_vocab.write_tokenizer(os.path.join(tmp, "1"), pad_token=clip_vocab.EOS)
        clip_vocab.write_tokenizer(os.path.join(tmp, "2"), pad_token="!")
        tok1 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "1"))
        tok2 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "2"))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                       interpolation_type="linear", prediction_type="epsilon", use_karras_sigmas=False)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    path = os.path.join(out_dir, "pipe")
    pipe.save_pretrained(path, safe_serialization=True)

    pipe = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    tensors = {}
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            for k, (tok, te) in enumerate([(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]):
                ids = tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
                out = te(ids, output_hidden_states=True)
                tensors[f"{i}.te{k + 1}.input_ids"] = ids
                tensors[f"{i}.te{k + 1}.penultimate"] = out.hidden_states[-2].contiguous()
                if k == 1:
                    tensors[f"{i}.te2.text_embeds"] = out.text_embeds.contiguous()
        for neg_name, neg in [("none", None), ("neg", PROMPTS[2])]:
            pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS[0], device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True, negative_prompt=neg)
            tensors.update({f"encode.{neg_name}.prompt_embeds": pe, f"encode.{neg_name}.negative_prompt_embeds": npe,
                            f"encode.{neg_name}.pooled": pooled, f"encode.{neg_name}.negative_pooled": npooled})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "encoders.safetensors"))


def sdxl_counts(out_dir):
    """SDXL-base's text encoders and VAE from their published configs, counted on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te1 = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    te2 = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        counts = {"text_encoder": count(CLIPTextModel(te1)), "text_encoder_2": count(CLIPTextModelWithProjection(te2)),
                  "vae": count(AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                             down_block_types=["DownEncoderBlock2D"] * 4,
                                             up_block_types=["UpDecoderBlock2D"] * 4, sample_size=1024))}
    with open(os.path.join(out_dir, "counts.json"), "w") as f:
        json.dump(counts, f)


def generate(cases_file):
    import diffusers
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    with open(cases_file) as f:
        cases = json.load(f)
    pipes = {}
    dtypes = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for case in cases:
        loras = [tuple(lora) for lora in case.get("loras") or []]
        key = (case["model"], case.get("unet"), case.get("dtype"), tuple(loras))
        if key not in pipes:
            dtype = dtypes[key[2]]
            extra = {"unet": UNet2DConditionModel.from_pretrained(case["unet"], torch_dtype=dtype)} if case.get("unet") else {}
            pipe = StableDiffusionXLPipeline.from_pretrained(case["model"], add_watermarker=False, torch_dtype=dtype, **extra)
            pipe.set_progress_bar_config(disable=True)
            for i, (file, scale) in enumerate(loras):  # fused, as `sdkd generate --lora FILE:SCALE`
                pipe.load_lora_weights(os.path.dirname(file), weight_name=os.path.basename(file), adapter_name=f"l{i}")
                pipe.fuse_lora(lora_scale=scale, adapter_names=[f"l{i}"])
            pipes[key] = (pipe, pipe.scheduler.config)
        pipe, base = pipes[key]
        pipe.scheduler = getattr(diffusers, SCHEDULERS[case["scheduler"]]).from_config(base)
        extra = {}
        for key, arg in [("original_size", "original_size"), ("target_size", "target_size"), ("crop", "crops_coords_top_left")]:
            if case.get(key) is not None:
                extra[arg] = tuple(case[key])
        images = pipe(case["prompt"], negative_prompt=case.get("negative_prompt"), num_inference_steps=case["steps"],
                      guidance_scale=case["guidance_scale"], guidance_rescale=case.get("guidance_rescale", 0.0),
                      height=case["height"], width=case["width"], num_images_per_prompt=case["samples"],
                      generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="pil", **extra).images
        for i, image in enumerate(images):
            image.save(f"{case['out']}-{i}.png")


# --- the tables of diffusers' scripts/convert_diffusers_to_original_sdxl.py (SDXL's UNet layout) ---------
UNET_MAP = [
    ("time_embed.0.weight", "time_embedding.linear_1.weight"), ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"), ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias"),
    ("label_emb.0.0.weight", "add_embedding.linear_1.weight"), ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "add_embedding.linear_2.weight"), ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
]
UNET_MAP_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
                   ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
UNET_MAP_LAYER = []
for i in range(3):
    for j in range(2):
        UNET_MAP_LAYER.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
        if i > 0:
            UNET_MAP_LAYER.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
    for j in range(4):
        UNET_MAP_LAYER.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
        if i < 2:
            UNET_MAP_LAYER.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
    if i < 3:
        UNET_MAP_LAYER.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        UNET_MAP_LAYER.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
UNET_MAP_LAYER.append(("output_blocks.2.2.conv.", "output_blocks.2.1.conv."))
UNET_MAP_LAYER.append(("middle_block.1.", "mid_block.attentions.0."))
for j in range(2):
    UNET_MAP_LAYER.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))


def sgm_unet(sd):
    mapping = {k: k for k in sd}
    for sd_name, hf_name in UNET_MAP:
        mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in UNET_MAP_RESNET:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    for k, v in mapping.items():
        for sd_part, hf_part in UNET_MAP_LAYER:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    return {"model.diffusion_model." + v: sd[k] for k, v in mapping.items()}


def sgm_vae(sd, levels, layers):
    vae_map = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(levels):
        for j in range(layers):
            vae_map.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < levels - 1:
            vae_map.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            vae_map.append((f"up.{levels - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(layers + 1):
            vae_map.append((f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        vae_map.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attn_map = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for k, t in sd.items():
        v = k
        for sd_part, hf_part in vae_map:
            v = v.replace(hf_part, sd_part)
        if "attentions" in k:
            for sd_part, hf_part in attn_map:
                v = v.replace(hf_part, sd_part)
        if any(f"mid.attn_1.{w}.weight" in v for w in ["q", "k", "v", "proj_out"]) and t.ndim != 1:
            t = t.reshape(*t.shape, 1, 1)
        out["first_stage_model." + v] = t
    return out


TEXTENC_MAP = [("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
               (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"), ("ln_final.", "text_model.final_layer_norm."),
               ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
               ("positional_embedding", "text_model.embeddings.position_embedding.weight")]


def sgm_open_clip(sd):
    import re
    protected = {re.escape(hf): ldm for ldm, hf in TEXTENC_MAP}
    pattern = re.compile("|".join(protected.keys()))
    relabel = lambda k: pattern.sub(lambda m: protected[re.escape(m.group(0))], k)  # noqa: E731
    out, qkv = {}, {}
    for k, v in sd.items():
        m = re.match(r"(.*)\.(q|k|v)_proj\.(weight|bias)$", k)
        if m and m.group(1).endswith(".self_attn"):
            qkv.setdefault((m.group(1), m.group(3)), [None] * 3)["qkv".index(m.group(2))] = v
            continue
        if k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()  # SGM's layout: x @ text_projection
            continue
        out[relabel(k)] = v
    for (pre, leaf), parts in qkv.items():
        out[relabel(pre) + f".in_proj_{leaf}"] = torch.cat(parts)
    return {"conditioner.embedders.1.model." + k: v for k, v in out.items()}


def write_sgm(pipe_dir, stem):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir, add_watermarker=False)
    vae_cfg = pipe.vae.config
    sd = {**sgm_unet(pipe.unet.state_dict()),
          **sgm_vae(pipe.vae.state_dict(), len(vae_cfg.block_out_channels), vae_cfg.layers_per_block),
          # SGM's FrozenCLIPEmbedder holds a transformers CLIPTextModel: text_model.* below the prefix
          **{"conditioner.embedders.0.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
             for k, v in pipe.text_encoder.state_dict().items()},
          **sgm_open_clip(pipe.text_encoder_2.state_dict())}
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, stem + ".safetensors")
    torch.save({"state_dict": sd, "global_step": 1}, stem + ".ckpt")


def from_single_file(file, config, out_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(file, config=config, local_files_only=True, add_watermarker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)


def kd_step(pipe, student_dir, pairs_json, out_file):
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(os.path.join(pipe, "unet")).eval()
    student = UNet2DConditionModel.from_pretrained(student_dir).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(pipe, subfolder="scheduler")
    with open(pairs_json) as f:
        pairs = json.load(f)
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([37, 801], dtype=torch.int64)
    context = torch.randn(2, 77, teacher.config.cross_attention_dim, generator=gen)
    pooled = torch.randn(2, 12, generator=gen)
    time_ids = torch.tensor([[20.0, 24.0, 2.0, 14.0, 16.0, 16.0], [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
    added = {"text_embeds": pooled, "time_ids": time_ids}
    noisy = scheduler.add_noise(latents, noise, t)

    def run(model, names):
        feats, hooks = {}, []
        for name in names:
            def f(_m, _i, out, name=name):
                feats[name] = out[0] if isinstance(out, tuple) else out
            hooks.append(model.get_submodule(name).register_forward_hook(f))
        out = model(noisy, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        for h in hooks:
            h.remove()
        return out, feats

    with torch.no_grad():
        t_out, t_feats = run(teacher, [p[0] for p in pairs])
    s_out, s_feats = run(student, [p[1] for p in pairs])
    task = F.mse_loss(s_out.float(), noise.float())
    output_kd = F.mse_loss(s_out.float(), t_out.float())
    feature_kd = sum(F.mse_loss(s_feats[s].float(), t_feats[tn].float()) for tn, s in pairs)
    total = task + output_kd + feature_kd
    total.backward()
    tensors = {"latents": latents, "noise": noise, "t": t, "context": context, "pooled": pooled, "time_ids": time_ids,
               "loss.total": total.detach(), "loss.task": task.detach(), "loss.output_kd": output_kd.detach(),
               "loss.feature_kd": feature_kd.detach()}
    tensors.update({f"grad.{n}": p.grad for n, p in student.named_parameters() if p.grad is not None})
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_file)


def main():
    torch.set_num_threads(1)
    if sys.argv[1] == "make":
        out_dir = sys.argv[2]
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        make_unets(out_dir, gen)
        make_pipeline(out_dir, gen)
        sdxl_counts(out_dir)
    elif sys.argv[1] == "sgm":
        write_sgm(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "single_files":
        write_sgm(sys.argv[2], sys.argv[4])
        from_single_file(sys.argv[3], sys.argv[2], sys.argv[5])
    elif sys.argv[1] == "from_single_file":
        from_single_file(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "kd_step":
        kd_step(*sys.argv[2:6])
    elif sys.argv[1] == "generate":
        generate(sys.argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
