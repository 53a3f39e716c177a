"""References for tests/clip_score.rs: open_clip on a random-weight CLIP with ViT-g-14's structure.

usage: clip_score_reference.py OUT_DIR

ViT-g-14.json (open_clip's model_configs) with tiny widths and layers: the same modules (pre-norm
ViT with class token, ln_pre, ln_post, proj; causal text transformer, argmax pooling,
text_projection; GELU, no layer scale, no attentional pool), image size 224 and patch 14 as
published, mlp_ratio 4.3637 as published (so the MLP width is odd). Writes
- OUT_DIR/model/open_clip_pytorch_model.bin (torch.save of the state dict),
  OUT_DIR/model/open_clip_model.safetensors and OUT_DIR/model/open_clip_config.json (the hub's
  layout: {"model_cfg": ..., "preprocess_cfg": ...}),
- OUT_DIR/images/*.png of several sizes and aspects and OUT_DIR/images/metadata.csv (file_name, text),
- OUT_DIR/expected.safetensors: open_clip's preprocessing (create_model_and_transforms' val
  transform: image_transform_v2 of the default PreprocessCfg), tokens, encode_image and
  encode_text outputs, per-pair cosines,
- OUT_DIR/expected.json: mean cosine and torchmetrics' max(mean of 100 cos, 0).
"""
import csv
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

torch.set_num_threads(2)
out = sys.argv[1]
os.makedirs(os.path.join(out, "model"), exist_ok=True)
os.makedirs(os.path.join(out, "images"), exist_ok=True)
torch.manual_seed(0)

import open_clip  # noqa: E402
from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402

g14 = json.load(open(os.path.join(os.path.dirname(open_clip.__file__), "model_configs", "ViT-g-14.json")))
cfg = json.loads(json.dumps(g14))
cfg["embed_dim"] = 48
cfg["vision_cfg"].update(layers=2, width=64, head_width=32)  # 2 heads; mlp_ratio 4.3637 -> 279
cfg["text_cfg"].update(width=64, heads=4, layers=2)
assert set(cfg["vision_cfg"]) == set(g14["vision_cfg"]) and set(cfg["text_cfg"]) == set(g14["text_cfg"])
model = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
model.eval()
# every parameter matters: layer norms away from (1, 0), biases non-zero
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
            p.add_(0.1 * torch.randn_like(p))
# images: smooth random content at several sizes, aspects and centre-crop roundings
sizes = [(300, 200), (200, 300), (224, 224), (500, 333), (225, 301), (64, 48)]
captions = [
    "A cat sitting on a red couch.",
    "  Two  DOGS playing in the   snow &amp; a man watching ",
    "a photo of a bowl of fruit, apples & oranges!",
    "An airplane flying over the city at sunset; it's beautiful.",
    "a " + " ".join(["very"] * 90) + " long caption that open_clip truncates",
    "A kitchen with a stove, a sink and 3 chairs.",
]
names = []
for i, (w, h) in enumerate(sizes):
    base = torch.rand(3, 8, 8)
    img = torch.nn.functional.interpolate(base[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    img = (img + 0.15 * torch.rand(3, h, w)).clamp(0, 1)
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    name = f"img{i}.png"
    Image.fromarray(arr).save(os.path.join(out, "images", name))
    names.append(name)
with open(os.path.join(out, "images", "metadata.csv"), "w", newline="") as f:
    wr = csv.writer(f)
    wr.writerow(["file_name", "text"])
    for n, c in zip(names, captions):
        wr.writerow([n, c])

pp = PreprocessCfg()  # ViT-g-14's: 224, OPENAI mean/std, bicubic, shortest
preprocess = image_transform_v2(pp, is_train=False)
pixels = torch.stack([preprocess(Image.open(os.path.join(out, "images", n))) for n in names])
tokenizer = open_clip.get_tokenizer("ViT-g-14")
tokens = tokenizer(captions)
# tokenizer edge cases: cleaning (ftfy's quotes, ligatures, width; html entities; whitespace),
# open_clip's own special tokens, NFD input, Greek final sigma, digits, emoji, truncation
tok_cases = [
    "It\u2019s a \u201cquoted\u201d \ufb01sh \uff21\uff22\uff23\u3000done",
    "fish &amp;amp; chips &lt;3 &#233;t&#xE9; &quot;x&quot; caf\u0065\u0301",
    "hi <end_of_text> there <START_OF_TEXT> <|endoftext|>. ok",
    "\u039f\u0394\u039f\u03a3 \u03a3\u03a3 2024 \U0001f600\U0001f436 tab\there\nnew  line ",
    "don't won't we'll they're I'm you've he'd",
    " ".join(["word"] * 80),
    "",
]
tok_ids = tokenizer(tok_cases)
with torch.no_grad():
    img_emb = model.encode_image(pixels)
    txt_emb = model.encode_text(tokens)
    cosine = lambda a, b: (torch.nn.functional.normalize(a, dim=-1) * torch.nn.functional.normalize(b, dim=-1)).sum(-1)
    cos = cosine(img_emb, txt_emb)
    if cos.mean() < 0:  # a positive mean, so that torchmetrics' clamp at 0 leaves a number to compare
        model.text_projection.neg_()
        txt_emb = model.encode_text(tokens)
        cos = cosine(img_emb, txt_emb)
sd = {k: v.contiguous() for k, v in model.state_dict().items()}
torch.save(sd, os.path.join(out, "model", "open_clip_pytorch_model.bin"))
save_file(sd, os.path.join(out, "model", "open_clip_model.safetensors"))
with open(os.path.join(out, "model", "open_clip_config.json"), "w") as f:
    json.dump({"model_cfg": cfg, "preprocess_cfg": {"mean": list(pp.mean), "std": list(pp.std),
               "interpolation": pp.interpolation, "resize_mode": pp.resize_mode}}, f)
# a file that lacks one tensor (the bad-input test)
bad = dict(sd)
del bad["visual.ln_post.weight"]
save_file(bad, os.path.join(out, "missing_tensor.safetensors"))
save_file({"pixels": pixels.contiguous(), "tokens": tokens.contiguous(), "image_embeds": img_emb.contiguous(),
           "text_embeds": txt_emb.contiguous(), "cosine": cos.contiguous(), "tok_cases": tok_ids.contiguous()}, os.path.join(out, "expected.safetensors"))
# torchmetrics' CLIPScore.compute: max(mean of 100 cos, 0)
json.dump({"clip_score": cos.double().mean().item(),
           "clip_score_torchmetrics": max((100 * cos.double()).mean().item(), 0.0),
           "captions": captions, "names": names, "tok_cases": tok_cases}, open(os.path.join(out, "expected.json"), "w"), indent=1)
print("cosines", cos.tolist())
