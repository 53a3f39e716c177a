"""OpenAI's CLIP BPE vocabulary, rebuilt from the merges file that open_clip ships
(`open_clip/bpe_simple_vocab_16e6.txt.gz`; only the data file is read, open_clip is not imported),
written as a Stable Diffusion `tokenizer/` folder.

    write_tokenizer(out_dir, pad_token="<|endoftext|>")   # SD-1.x layout ("!" for SD-2.x)

The vocabulary is built the way CLIP builds it: the 256 byte characters, the same with `</w>`,
one token per merge (48,894 merges), then `<|startoftext|>` and `<|endoftext|>`: 49,408 tokens.
"""
import gzip
import importlib.util
import json
import os

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def merges_path():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise SystemExit("open_clip (open-clip-torch) is not installed: its bpe_simple_vocab_16e6.txt.gz is the CLIP vocabulary")
    return os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")


def openai_vocab():
    """(vocab list, merges list of 'a b' strings) exactly as CLIP's SimpleTokenizer builds them."""
    lines = gzip.open(merges_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS, EOS]
    return vocab, merges


def _added(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(out_dir, pad_token=EOS, model_max_length=77):
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json as the published
    SD-1.x (pad `<|endoftext|>`) and SD-2.x (pad `!`) tokenizer folders have them."""
    os.makedirs(out_dir, exist_ok=True)
    vocab, merges = openai_vocab()
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "add_prefix_space": False,
        "bos_token": _added(BOS),
        "do_lower_case": True,
        "eos_token": _added(EOS),
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added(EOS),
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    special = {k: {kk: vv for kk, vv in v.items() if kk != "__type"} for k, v in config.items() if k.endswith("_token") and isinstance(v, dict)}
    special["pad_token"] = pad_token
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
