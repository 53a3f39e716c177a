"""Writes a tiny, complete Stable Diffusion pipeline folder with diffusers'
`StableDiffusionPipeline.save_pretrained`, built from tiny random parts (no hub access) with every
weight perturbed, so that tests of text-to-image, distillation and `inspect --model` have a real
diffusers folder to read. `StableDiffusionPipeline.from_pretrained(out_dir)` loads it.

usage: make_pipeline.py OUT_DIR [options]

  OUT_DIR                     created (or overwritten part by part)
  --prediction-type P         epsilon (default) | v_prediction: the scheduler's prediction_type
  --linear-projection         UNet use_linear_projection=True (SD-2.x style), default False
  --upcast-attention          UNet upcast_attention=True (SD-2.x style)
  --scheduler S               pndm (default, SD-1.5's PNDMScheduler config) | ddim | ddpm | euler
  --hidden-act A              text encoder activation: quick_gelu (default, SD-1.x) | gelu (SD-2.x)
  --pad-token T               tokenizer pad token: "<|endoftext|>" (default, SD-1.x) | "!" (SD-2.x)
  --stages N                  UNet stages: 2 (default; block_out_channels [32, 64], 1 layer per block)
                              or 4 (SD-1.x layout: 3 cross-attention stages + 1 plain, 2 layers per
                              block, [32, 32, 64, 64], mid block), which BK-SDM presets can prune
  --sample-size N             UNet sample_size in latents (default 8); the VAE's is 2 N
  --legacy-vae-names          save the VAE's mid-block attentions as query/key/value/proj_attn
  --seed N                    seed of the random weights and perturbations (default 0)
  --expect FILE               reload OUT_DIR with StableDiffusionPipeline.from_pretrained and write
                              what diffusers/transformers count: {"unet": {"params"}, "vae": {"params"},
                              "text_encoder": {"params", "hidden_size"}, "tokenizer": {"vocab_size",
                              "pad_token_id", "model_max_length"}, "scheduler": {"class", config...}}

The parts: UNet2DConditionModel (cross_attention_dim 32, 2 heads, norm groups 8), AutoencoderKL
(block_out_channels [8, 16]: 2x downscale, 4 latent channels, norm groups 4, scaling_factor
0.18215), CLIPTextModel (hidden 32, 3 layers, 4 heads, intermediate 37, vocabulary 49,408), the real
CLIP BPE tokenizer (from open_clip's merges file, see clip_vocab.py), no safety checker.
"""
import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_vocab  # noqa: E402


def perturb(model, scale, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def build(args):
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    if args.stages == 2:
        blocks = dict(block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    else:
        blocks = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    unet = UNet2DConditionModel(sample_size=args.sample_size, in_channels=4, out_channels=4, cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=8, use_linear_projection=args.linear_projection,
                                upcast_attention=args.upcast_attention, **blocks)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=2 * args.sample_size,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                                                hidden_act=args.hidden_act))
    for model in (unet, vae, text_encoder):
        perturb(model, 0.02, gen)
    with tempfile.TemporaryDirectory() as tmp:
        clip_vocab.write_tokenizer(tmp, pad_token=args.pad_token)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type=args.prediction_type)
    scheduler = {
        "pndm": lambda: PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, **common),
        "ddim": lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **common),
        "ddpm": lambda: DDPMScheduler(clip_sample=False, **common),
        "euler": lambda: EulerDiscreteScheduler(steps_offset=1, **common),
    }[args.scheduler]()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(args.out_dir, safe_serialization=True)
    if args.legacy_vae_names:
        from safetensors.torch import load_file, save_file

        path = os.path.join(args.out_dir, "vae", "diffusion_pytorch_model.safetensors")
        sd = load_file(path)
        renamed = {}
        for k, v in sd.items():
            for new, old in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")]:
                k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            renamed[k] = v
        save_file(renamed, path, metadata={"format": "pt"})


def expect(args):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.out_dir)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tok = pipe.tokenizer
    sched = dict(pipe.scheduler.config)
    sched = {k: v for k, v in sched.items() if not k.startswith("_")}
    sched["class"] = type(pipe.scheduler).__name__
    out = {
        "unet": {"params": count(pipe.unet)},
        "vae": {"params": count(pipe.vae)},
        "text_encoder": {"params": count(pipe.text_encoder), "hidden_size": pipe.text_encoder.config.hidden_size},
        "tokenizer": {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "model_max_length": tok.model_max_length},
        "scheduler": sched,
    }
    with open(args.expect, "w") as f:
        json.dump(out, f, indent=2, default=list)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    ap.add_argument("--linear-projection", action="store_true")
    ap.add_argument("--upcast-attention", action="store_true")
    ap.add_argument("--scheduler", default="pndm", choices=["pndm", "ddim", "ddpm", "euler"])
    ap.add_argument("--hidden-act", default="quick_gelu", choices=["quick_gelu", "gelu"])
    ap.add_argument("--pad-token", default=clip_vocab.EOS)
    ap.add_argument("--stages", type=int, default=2, choices=[2, 4])
    ap.add_argument("--sample-size", type=int, default=8)
    ap.add_argument("--legacy-vae-names", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expect")
    args = ap.parse_args()
    torch.set_num_threads(1)
    build(args)
    if args.expect:
        expect(args)


if __name__ == "__main__":
    main()
