"""A random LoRA made with peft on a diffusers pipeline's UNet and text encoder, saved the way
diffusers and kohya's tools save one, for tests/generate.rs (`sdkd generate --lora`).

usage: make_lora.py PIPELINE_DIR OUT_DIR

For an SDXL pipeline (a text_encoder_2 folder) the second text encoder gets the text encoder's
config too, the file is written by StableDiffusionXLPipeline.save_lora_weights, and no kohya file
is made (diffusers' converter writes diffusers' UNet names, where sd-scripts' SDXL files have SGM's).

  UNet:         LoraConfig(r=4, lora_alpha=8, diffusers' LCM-LoRA target list (linear layers, the
                1x1 proj_in/proj_out convs, the 3x3 resnet, downsampler and upsampler convs),
                rank_pattern {"conv2": 2}, alpha_pattern {"proj_out": 2})
  text encoder: LoraConfig(r=2, lora_alpha=3, q/k/v/out_proj, fc1, fc2)

Every lora_B is drawn from N(0, 0.1^2) (peft initialises B to zero, which would change nothing).
Writes OUT_DIR/pytorch_lora_weights.safetensors with StableDiffusionPipeline.save_lora_weights
(each component's LoraConfig in the lora_adapter_metadata header), and OUT_DIR/kohya.safetensors:
the same tensors through diffusers' convert_state_dict_to_kohya, whose `.alpha` (it writes the
rank) is set to each layer's lora_alpha as kohya's sd-scripts stores it.
"""
import os
import sys

import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTextModelWithProjection

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def randomise_b(model, gen):
    for name, p in sorted(model.named_parameters()):
        if ".lora_B." in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def alphas(model, prefix):
    return {f"{prefix}{name.replace('.', '_')}": float(m.lora_alpha["default"])
            for name, m in model.named_modules() if hasattr(m, "lora_alpha") and "default" in m.lora_alpha}


def main():
    pipe_dir, out = sys.argv[1], sys.argv[2]
    xl = os.path.isdir(os.path.join(pipe_dir, "text_encoder_2"))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(pipe_dir, "unet"))
    encoders = [CLIPTextModel.from_pretrained(os.path.join(pipe_dir, "text_encoder"))]
    if xl:
        encoders.append(CLIPTextModelWithProjection.from_pretrained(os.path.join(pipe_dir, "text_encoder_2")))
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, rank_pattern={"conv2": 2},
                                alpha_pattern={"proj_out": 2}))
    for te in encoders:
        te.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]))
    for model in [unet, *encoders]:
        randomise_b(model, gen)
    layers = dict(unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
                  text_encoder_lora_layers=get_peft_model_state_dict(encoders[0]),
                  text_encoder_lora_adapter_metadata=encoders[0].peft_config["default"].to_dict())
    if xl:
        StableDiffusionXLPipeline.save_lora_weights(
            out, text_encoder_2_lora_layers=get_peft_model_state_dict(encoders[1]),
            text_encoder_2_lora_adapter_metadata=encoders[1].peft_config["default"].to_dict(), **layers)
        return
    StableDiffusionPipeline.save_lora_weights(out, **layers)
    peft_sd = safetensors.torch.load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    kohya = convert_state_dict_to_kohya(peft_sd)
    true_alpha = {**alphas(unet, "lora_unet_"), **alphas(encoders[0], "lora_te1_")}
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(true_alpha[key[:-len(".alpha")]], dtype=torch.float32)
    safetensors.torch.save_file({k: v.contiguous() for k, v in kohya.items()}, os.path.join(out, "kohya.safetensors"))

if __name__ == "__main__":
    main()
