"""Reference outputs for tests/encoders.rs: transformers' CLIPTokenizer and CLIPTextModel and
diffusers' AutoencoderKL on tiny random, perturbed models.

    make_encoders.py <out_dir>

Writes into <out_dir>:
  tok_sd15/, tok_sd21/        vocab.json + merges.txt (real CLIP vocabulary), SD-1.x / SD-2.x ("!" pad)
  tok_sd15_json/, tok_sd21_json/   the same saved by transformers (tokenizer.json + tokenizer_config.json)
  tok_min/                    vocab.json + merges.txt with a tokenizer_config.json holding only model_max_length
  tokenizer_cases.json        {"texts": [...], "variants": {name: {"ids", "padded", "decoded", "vocab_size", "pad_token_id"}}}
  clip_quick/, clip_gelu/     CLIPTextModel folders (transformers 5 names, no "text_model." prefix)
  clip_prefixed/              clip_quick's weights under the published "text_model." names plus the old position_ids buffer
  clip_<name>_io.safetensors  input_ids, last_hidden_state, pooled, hidden_states.<i>, skip1 (clip skip 1)
  vae_a/, vae_b/, vae_c/      AutoencoderKL folders (three block layouts)
  vae_legacy/                 vae_a's weights under the legacy attention names (query/key/value/proj_attn)
  vae_<name>_io.safetensors   x, mean, logvar, noise, sample, seeded (seed 1234), z, decoded, forward
"""
import json
import os
import random
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_vocab  # noqa: E402

NEGATIVE = (
    "(deformed iris, deformed pupils, semi-realistic, cgi, render, sketch, cartoon, drawing, anime), text, cropped, "
    "out of frame, worst quality, low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra fingers, "
    "mutated hands, poorly drawn hands, poorly drawn face, mutation, deformed, blurry, dehydrated, bad anatomy, bad "
    "proportions, extra limbs, cloned face, disfigured, gross proportions, malformed limbs, missing arms, missing legs, "
    "extra arms, extra legs, fused fingers, too many fingers, long neck, BadDream, UnrealisticDream"
)

FIXED = [
    "", " ", "\t\n ", "a toy panda standing on a pile of broccoli", NEGATIVE, NEGATIVE.upper(), NEGATIVE * 3,
    "a photo of a cat", "Hello <|endoftext|> world", "Hello <|ENDOFTEXT|> world", "x<|STARTOFTEXT|>y",
    "<|startoftext|>", "<|endoftext|><|endoftext|>", "a<|endoftext|>b<|startoftext|>c", "<|endoftext", "|>",
    "it's I'LL we'Re they've i'm you'd don't", "it’s curly ’s", "''s 's''", "İstanbul ΣΑΣ σας", "café cafe\u0301",
    "ﬁne ½ ² Ⅻ ①", "１２３ＡＢＣ", "٣٤٥ ๑๒๓", "한국어 텍스트 \u1100\u1161", "日本語のテキスト、漢字。", "中文，标点！",
    "Привет, мир!", "مرحبا بالعالم", "नमस्ते दुनिया", "😀😀 hi!!", "👨‍👩‍👧‍👦 family 👍🏽", "🇯🇵🇺🇸 flags", "a\u200bb\u200dc",
    "\x00\x01\x7f control", "tab\tnew\nline\r\ncr", "nbsp\u00a0thin\u2009ideo\u3000space", "1234.5 3.14159 1e10 -7",
    "(masterpiece:1.2), [[best quality]], {detailed}", "a | b || c", "!!!???...", "!", "hi! there!", "a!b", "...",
    "ǅungla ß straße", "MiXeD CaSe WoRdS", "&amp; &lt;tag&gt; &#39;", "https://example.com/a?b=c&d=e#f",
    "email@example.com", "C:\\path\\to\\file.png", "snake_case_name and kebab-case-name", "ÅÅÅ Å", "ⓐⓑⓒ",
    "𝔣𝔯𝔞𝔨𝔱𝔲𝔯 𝓈𝒸𝓇𝒾𝓅𝓉", "Ⱥ ȿ", "\ufeffbom", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "lol" * 40,
]

WORDS = (
    "a an the photo painting portrait of cat dog astronaut riding horse on mars castle forest sunset city night "
    "highly detailed 8k 4k trending artstation octane render unreal engine by greg rutkowski studio ghibli "
    "cinematic lighting bokeh sharp focus intricate elegant concept art illustration smooth digital hyperrealistic "
    "volumetric fog golden hour wide angle close-up macro vintage film grain kodak portra 35mm colorful vibrant "
    "pastel minimalist surreal dreamlike epic fantasy sci-fi cyberpunk steampunk watercolor oil ink sketch anime "
    "don't it's can't we'll they're I'm you've baby's teddy-bear half-life x-ray t-shirt"
).split()

RANGES = [
    (0x20, 0x7E), (0xA0, 0xFF), (0x100, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF),
    (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F), (0x2070, 0x209F), (0x20A0, 0x20CF),
    (0x2150, 0x218F), (0x2190, 0x21FF), (0x2460, 0x24FF), (0x2500, 0x257F), (0x3000, 0x303F), (0x3040, 0x30FF),
    (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xFB00, 0xFB4F), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F), (0x1F680, 0x1F6FF),
    (0x1F900, 0x1F9FF), (0x1D400, 0x1D4FF), (0x0300, 0x036F),
]


def random_texts(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:  # prompt-like
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 30))]
            seps = [" ", " ", " ", ", ", ". ", "  ", ",", " (", ") ", ":1.3 ", " | ", "! ", "? ", "\n"]
            text = "".join(w + rng.choice(seps) for w in words)
            if rng.random() < 0.3:
                text = text.title() if rng.random() < 0.5 else text.upper()
        elif kind == 1:  # unicode soup
            chars = []
            for _ in range(rng.randint(1, 40)):
                lo, hi = rng.choice(RANGES)
                chars.append(chr(rng.randint(lo, hi)))
                if rng.random() < 0.15:
                    chars.append(rng.choice([" ", "\t", "\n", "\u00a0", "\u3000", "  "]))
            text = "".join(chars)
        elif kind == 2:  # numbers and punctuation
            parts = []
            for _ in range(rng.randint(1, 20)):
                r = rng.random()
                if r < 0.3:
                    parts.append(str(rng.randint(0, 10**rng.randint(1, 12))))
                elif r < 0.5:
                    parts.append(f"{rng.uniform(-1000, 1000):.{rng.randint(0, 5)}f}")
                elif r < 0.8:
                    parts.append("".join(rng.choice("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") for _ in range(rng.randint(1, 6))))
                else:
                    parts.append(rng.choice(WORDS))
            text = rng.choice(["", " "]).join(parts)
        elif kind == 3:  # mixtures with special tokens, contractions, emoji
            pieces = [rng.choice(WORDS), rng.choice(["<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "'s", "'LL",
                      "😀", "👍🏽", "e\u0301", "İ", "Σ", "ﬀ", "\u200d", "’", "!", "!!"]), rng.choice(WORDS)]
            rng.shuffle(pieces)
            text = rng.choice(["", " "]).join(pieces)
        else:  # over-long
            words = [rng.choice(WORDS) for _ in range(rng.randint(60, 160))]
            text = ", ".join(words)
        out.append(text)
    return out


def perturb(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tokenizers(out):
    from transformers import CLIPTokenizer

    clip_vocab.write_tokenizer(f"{out}/tok_sd15")
    clip_vocab.write_tokenizer(f"{out}/tok_sd21", pad_token="!")
    os.makedirs(f"{out}/tok_min", exist_ok=True)
    for f in ["vocab.json", "merges.txt"]:
        shutil.copy(f"{out}/tok_sd15/{f}", f"{out}/tok_min/{f}")
    with open(f"{out}/tok_min/tokenizer_config.json", "w") as f:
        json.dump({"model_max_length": 77}, f)
    for name in ["tok_sd15", "tok_sd21"]:
        CLIPTokenizer.from_pretrained(f"{out}/{name}").save_pretrained(f"{out}/{name}_json")
        for f in ["vocab.json", "merges.txt"]:  # make sure the Rust side reads tokenizer.json
            if os.path.exists(f"{out}/{name}_json/{f}"):
                os.remove(f"{out}/{name}_json/{f}")
    texts = FIXED + random_texts(1200)
    variants = {}
    for name in ["tok_sd15", "tok_sd21", "tok_sd15_json", "tok_sd21_json", "tok_min"]:
        tok = CLIPTokenizer.from_pretrained(f"{out}/{name}")
        ids = tok(texts).input_ids
        padded = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        decoded = [tok.decode(i, skip_special_tokens=True) for i in ids]
        variants[name] = {"ids": ids, "padded": padded, "decoded": decoded, "vocab_size": len(tok),
                          "pad_token_id": tok.pad_token_id, "model_max_length": tok.model_max_length}
    with open(f"{out}/tokenizer_cases.json", "w", encoding="utf-8") as f:
        json.dump({"texts": texts, "variants": variants}, f, ensure_ascii=False)


def clip_models(out):
    from transformers import CLIPTextConfig, CLIPTextModel

    for i, (name, act, eos) in enumerate([("quick", "quick_gelu", 2), ("gelu", "gelu", 99)]):
        torch.manual_seed(10 + i)
        cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                             num_attention_heads=4, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
                             bos_token_id=98, eos_token_id=eos, pad_token_id=1)
        model = CLIPTextModel(cfg).eval()
        perturb(model, 0.1, 100 + i)
        model.save_pretrained(f"{out}/clip_{name}")
        g = torch.Generator().manual_seed(20 + i)
        ids = torch.randint(0, 98, (3, 77), generator=g)
        ids[:, 0] = 98
        ids[0, 10] = 99
        ids[1, 76] = 99
        ids[2, 40:] = 99
        with torch.no_grad():
            o = model(ids, output_hidden_states=True)
            skip1 = model.final_layer_norm(o.hidden_states[-2])
            short = model(ids[:, :10]).last_hidden_state
        t = {"input_ids": ids, "last_hidden_state": o.last_hidden_state, "pooled": o.pooler_output, "skip1": skip1,
             "short_last_hidden_state": short}
        for j, h in enumerate(o.hidden_states):
            t[f"hidden_states.{j}"] = h
        save_file({k: v.contiguous() for k, v in t.items()}, f"{out}/clip_{name}_io.safetensors")
    # The published layout: "text_model."-prefixed names and the position_ids buffer.
    os.makedirs(f"{out}/clip_prefixed", exist_ok=True)
    shutil.copy(f"{out}/clip_quick/config.json", f"{out}/clip_prefixed/config.json")
    sd = load_file(f"{out}/clip_quick/model.safetensors")
    sd = {f"text_model.{k}": v for k, v in sd.items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_file(sd, f"{out}/clip_prefixed/model.safetensors", metadata={"format": "pt"})
    reloaded = CLIPTextModel.from_pretrained(f"{out}/clip_prefixed").eval()
    t = load_file(f"{out}/clip_quick_io.safetensors")
    with torch.no_grad():
        assert torch.equal(reloaded(t["input_ids"]).last_hidden_state, t["last_hidden_state"]), "prefixed reload differs"


def vaes(out):
    from diffusers import AutoencoderKL

    configs = {
        "a": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                  sample_size=16, scaling_factor=0.3),
        "b": dict(block_out_channels=(8, 8, 16), layers_per_block=2, norm_num_groups=2, latent_channels=3,
                  in_channels=2, out_channels=5, sample_size=24, use_quant_conv=False, use_post_quant_conv=False),
        "c": dict(block_out_channels=(16, 8), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                  mid_block_add_attention=False, scaling_factor=0.13025, shift_factor=0.1),
    }
    for i, (name, cfg) in enumerate(configs.items()):
        n = len(cfg["block_out_channels"])
        cfg = dict(cfg, down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
        torch.manual_seed(30 + i)
        vae = AutoencoderKL(**cfg).eval()
        perturb(vae, 0.05, 200 + i)
        vae.save_pretrained(f"{out}/vae_{name}")
        g = torch.Generator().manual_seed(40 + i)
        f = 2 ** (n - 1)
        x = torch.randn(2, vae.config.in_channels, 4 * f + 1, 3 * f, generator=g).clamp(-1, 1)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            noise = torch.randn(post.mean.shape, generator=g)
            seeded = post.sample(generator=torch.Generator().manual_seed(1234))
            z = torch.randn(2, vae.config.latent_channels, 5, 3, generator=g)
            t = {"x": x, "mean": post.mean, "logvar": post.logvar, "std": post.std, "noise": noise,
                 "sample": post.mean + post.std * noise, "seeded": seeded, "z": z, "decoded": vae.decode(z).sample,
                 "forward": vae(x).sample}
        save_file({k: v.contiguous() for k, v in t.items()}, f"{out}/vae_{name}_io.safetensors")
    # vae_a saved under the legacy attention names, which diffusers still loads.
    os.makedirs(f"{out}/vae_legacy", exist_ok=True)
    shutil.copy(f"{out}/vae_a/config.json", f"{out}/vae_legacy/config.json")
    sd = load_file(f"{out}/vae_a/diffusion_pytorch_model.safetensors")
    legacy = {}
    for k, v in sd.items():
        for new, old in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")]:
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    save_file(legacy, f"{out}/vae_legacy/diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    reloaded = AutoencoderKL.from_pretrained(f"{out}/vae_legacy").eval()
    t = load_file(f"{out}/vae_a_io.safetensors")
    with torch.no_grad():
        assert torch.equal(reloaded(t["x"]).sample, t["forward"]), "diffusers reads the legacy names differently"


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    what = sys.argv[2:] or ["tokenizer", "clip", "vae"]
    if "tokenizer" in what:
        tokenizers(out)
    if "clip" in what:
        clip_models(out)
    if "vae" in what:
        vaes(out)


if __name__ == "__main__":
    main()
