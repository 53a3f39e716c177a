"""Loads the demo's teacher pipeline folder (written by sdkd's `build_demo_teacher`) with
diffusers' `StableDiffusionPipeline.from_pretrained(dir, safety_checker=None)` and reports what
diffusers/transformers compute from it, for tests/demo_assets.rs to compare with sdkd:

    check_demo_pipeline.py PIPELINE_DIR CAPTIONS_JSON IMAGES_SAFETENSORS OUT_DIR

  CAPTIONS_JSON       a JSON list of texts
  IMAGES_SAFETENSORS  {"images": (n, 3, r, r) in [-1, 1]}
  OUT_DIR/ids.json    {"ids": [CLIPTokenizer(text).input_ids ...], "padded": [... padding="max_length"],
                       "vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "model_max_length",
                       "params": {"unet", "vae", "text_encoder"}, "scaling_factor", "sample_shape"}
  OUT_DIR/tensors.safetensors  "text_embeds" (last_hidden_state of the padded ids), "pooled",
                       "latent_mean" (VAE posterior mean of the images), "decoded" (VAE decode of it)

It also runs the pipeline for two steps at the VAE's sample size, so the folder is known to work
end to end in diffusers.
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def main():
    pipe_dir, captions_path, images_path, out_dir = sys.argv[1:5]
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None)
    tok = pipe.tokenizer
    texts = json.load(open(captions_path))
    ids = [tok(t).input_ids for t in texts]
    padded = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        enc = pipe.text_encoder(padded)
        images = load_file(images_path)["images"]
        mean = pipe.vae.encode(images).latent_dist.mean
        decoded = pipe.vae.decode(mean).sample
        res = pipe.vae.config.sample_size
        out = pipe(texts[0], num_inference_steps=2, height=res, width=res, guidance_scale=7.5,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="np")
    os.makedirs(out_dir, exist_ok=True)
    save_file({"text_embeds": enc.last_hidden_state.contiguous(), "pooled": enc.pooler_output.contiguous(),
               "latent_mean": mean.contiguous(), "decoded": decoded.contiguous()},
              os.path.join(out_dir, "tensors.safetensors"))
    count = lambda m: sum(p.numel() for p in m.parameters())
    report = {
        "ids": ids,
        "padded": padded.tolist(),
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "model_max_length": tok.model_max_length,
        "params": {"unet": count(pipe.unet), "vae": count(pipe.vae), "text_encoder": count(pipe.text_encoder)},
        "scaling_factor": pipe.vae.config.scaling_factor,
        "scheduler": type(pipe.scheduler).__name__,
        "sample_shape": list(out.images.shape),
    }
    with open(os.path.join(out_dir, "ids.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
