"""Pillow/numpy referee for the data pipeline (tests/data.rs).

    data_reference.py formats <dir>     writes the same picture as PNG, JPEG, lossy and lossless
                                        WebP, grayscale, RGBA and palette PNG, plus decoded.safetensors:
                                        what Pillow's Image.open(f).convert("RGB") reads from each.
    data_reference.py transform <dir>   writes noise images of awkward sizes, cases.json, and
                                        expected.safetensors: train_text_to_image.py's torchvision pipeline on each
                                        (Resize(res, BILINEAR) -> CenterCrop or crop -> hflip -> ToTensor ->
                                        Normalize(0.5, 0.5)), run by torchvision itself (pinned in
                                        scripts/constraints.txt) on the PIL image.
"""
import json
import os
import sys

import numpy as np
from PIL import Image
from safetensors.numpy import save_file


def picture(w, h):
    """A smooth picture with edges: gradients plus a disc, so lossy codecs stay near the source."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * x / (w - 1)
    g = 255 * y / (h - 1)
    b = 128 + 100 * np.sin(x / 7.0) * np.cos(y / 9.0)
    disc = (x - w * 0.6) ** 2 + (y - h * 0.4) ** 2 < (min(w, h) * 0.25) ** 2
    r[disc], g[disc], b[disc] = 250, 240, 20
    return np.clip(np.stack([r, g, b], -1), 0, 255).round().astype(np.uint8)


def formats(out):
    os.makedirs(out, exist_ok=True)
    rgb = Image.fromarray(picture(67, 45))
    files = {
        "photo.png": lambda p: rgb.save(p),
        "photo.jpg": lambda p: rgb.save(p, quality=92),
        "photo_lossy.webp": lambda p: rgb.save(p, quality=90),
        "photo_lossless.webp": lambda p: rgb.save(p, lossless=True),
        "gray.png": lambda p: rgb.convert("L").save(p),
        "rgba.png": lambda p: rgb.convert("RGBA").save(p),
        "palette.png": lambda p: rgb.convert("P", palette=Image.ADAPTIVE, colors=32).save(p),
    }
    decoded = {}
    for name, write in files.items():
        path = os.path.join(out, name)
        write(path)
        decoded[name] = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8).copy()
    save_file(decoded, os.path.join(out, "decoded.safetensors"))


def pipeline(img, res, center, left, top, flip):
    """train_text_to_image.py's transforms, by torchvision, with a given crop offset unless
    `center`. Returns the cropped pixels, the normalised tensor, the crop offset and whether the
    resize left the size as it was."""
    from torchvision import transforms
    from torchvision.transforms import functional as TF

    size = img.size
    img = transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR)(img)
    nw, nh = img.size
    if center:
        img = transforms.CenterCrop(res)(img)
        # the offset CenterCrop used (torchvision's center_crop: int(round((size - crop) / 2.0))),
        # for cases.json; checked against the crop itself below
        left, top = int(round((nw - res) / 2.0)), int(round((nh - res) / 2.0))
    else:
        img = TF.crop(img, top, left, res, res)
    if flip:
        img = TF.hflip(img)
    pixels = np.asarray(img, dtype=np.uint8).copy()
    x = transforms.Normalize([0.5], [0.5])(transforms.ToTensor()(img)).numpy()
    return pixels, np.ascontiguousarray(x), left, top, (nw, nh) == size


def transform(out):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(1234)
    # (w, h, res, center, left, top, flip): resize-free crops (odd and even margins), downscales
    # by awkward ratios, upscales, extreme aspect, random crops.
    cases = [
        (32, 32, 32, True, 0, 0, False),
        (45, 32, 32, True, 0, 0, True),  # (45-32)/2 = 6.5 rounds to 6
        (32, 47, 32, True, 0, 0, False),  # 7.5 rounds to 8
        (200, 150, 64, True, 0, 0, False),
        (150, 200, 64, True, 0, 0, True),
        (97, 61, 32, True, 0, 0, False),
        (23, 17, 32, True, 0, 0, False),
        (40, 30, 64, False, 13, 0, True),
        (300, 71, 32, False, 90, 0, False),
        (513, 512, 64, True, 0, 0, False),
    ]
    meta, expected = [], {}
    for i, (w, h, res, center, left, top, flip) in enumerate(cases):
        name = f"case{i}.png"
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(noise).save(os.path.join(out, name))
        source = Image.open(os.path.join(out, name)).convert("RGB")
        pixels, x, left, top, resize_free = pipeline(source, res, center, left, top, flip)
        if center:  # the offset recorded is the one CenterCrop took
            again, _, _, _, _ = pipeline(source, res, False, left, top, flip)
            assert np.array_equal(again, pixels), f"case {i}: CenterCrop's offset is not ({left}, {top})"
        expected[f"{i}.pixels"] = pixels
        expected[f"{i}.tensor"] = x
        meta.append({"file": name, "resolution": res, "center_crop": center, "left": left, "top": top, "flip": flip,
                     "resize_free": resize_free})
    save_file(expected, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(meta, f)


def bicubic(out):
    """Image.resize(size, BICUBIC) on noise and on hard-edged images (the negative lobes overshoot
    and clip), shrinking, enlarging and one axis at a time: the FID 256² squash, open_clip's 224."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(77)
    cases = [((512, 512), (256, 256)), ((640, 480), (256, 256)), ((500, 333), (256, 256)),
             ((37, 23), (256, 256)), ((300, 200), (336, 224)), ((224, 224), (299, 299)),
             ((256, 100), (256, 256)), ((100, 256), (77, 256)), ((7, 5), (3, 2))]
    meta, expected = [], {}
    for i, ((w, h), size) in enumerate(cases):
        if i % 2:
            px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:  # blocks of black and white: the filter's negative weights ring past 0 and 255
            px = ((np.add.outer(np.arange(h) // 3, np.arange(w) // 5) % 2) * 255).astype(np.uint8)
            px = np.stack([px, 255 - px, rng.integers(0, 256, (h, w), dtype=np.uint8)], axis=-1)
        name = f"bicubic{i}.png"
        Image.fromarray(px).save(os.path.join(out, name))
        img = Image.open(os.path.join(out, name)).convert("RGB")
        expected[f"{i}"] = np.asarray(img.resize(size, Image.BICUBIC), dtype=np.uint8).copy()
        meta.append({"file": name, "size": list(size)})
    save_file(expected, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    {"formats": formats, "transform": transform, "bicubic": bicubic}[sys.argv[1]](sys.argv[2])
