"""The data loader against the Python reference users run, side by side on the same webdataset
shards: sdkd's loader (`cargo bench --bench decode -- --data <shards>`) and webdataset + PIL +
torch DataLoader, with the same transforms (diffusers' train_text_to_image.py: resize the short
side to 512 bilinear, random crop 512, random flip, to tensor in [-1, 1]), batch 16 and the same
number of workers (sdkd: decode threads; PyTorch: DataLoader workers, one process each).

The shards hold LAION-like JPEGs: 512-1024 px on each side (random aspect), photo-like noise,
quality 90, img2dataset's layout (KEY.jpg, KEY.txt, KEY.json), written once into
target/bench/laion-shards/. Each round runs sdkd then the reference (A/B/A/B), each timing one
full shuffled pass after a warm-up pass; the ratio per round is sdkd's images/s over the
reference's, and the reported figure is the median over rounds.

Prints markdown table lines (scripts/bench.py puts them into docs/benchmarks.md) and writes
target/bench/loader.json.

Environment: SDKD_BENCH_ROUNDS [3], SDKD_LOADER_WORKERS [1,2], SDKD_LOADER_IMAGES [192].
"""
import io, json, os, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "bench"
SHARDS = OUT / "laion-shards"
IMAGES = int(os.environ.get("SDKD_LOADER_IMAGES", "192"))
PER_SHARD = 24
ROUNDS = int(os.environ.get("SDKD_BENCH_ROUNDS", "3"))
WORKERS = [int(w) for w in os.environ.get("SDKD_LOADER_WORKERS", "1,2").split(",")]
RES, BATCH = 512, 16


def make_shards():
    marker = SHARDS / f"done-{IMAGES}"
    if marker.exists():
        return
    import numpy as np
    import webdataset as wds
    from PIL import Image

    SHARDS.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(0, IMAGES, PER_SHARD):
        with wds.TarWriter(str(SHARDS / f"{s // PER_SHARD:05d}.tar")) as sink:
            for i in range(s, min(s + PER_SHARD, IMAGES)):
                w, h = (int(v) for v in rng.integers(512, 1025, size=2))
                # smooth colour fields plus per-pixel noise: the codec works as on photos
                base = rng.integers(0, 256, size=(h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)
                img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR), dtype=np.int16)
                img = np.clip(img + rng.integers(-16, 16, size=img.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                key = f"{s // PER_SHARD:05d}{i - s:04d}"
                sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": f"image {i}",
                            "json": {"caption": f"image {i}", "width": w, "height": h}})
    marker.write_text("")


def pattern():
    return str(SHARDS / f"{{00000..{(IMAGES - 1) // PER_SHARD:05d}}}.tar")


def sdkd(workers):
    p = subprocess.run(
        [os.environ.get("CARGO", "cargo"), "bench", "--bench", "decode", "--", "--data", pattern(),
         "--samples", str(IMAGES), "--threads", str(workers), "--batch-size", str(BATCH), "--resolution", str(RES)],
        cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench_loader: cargo bench failed:\n{p.stderr[-3000:]}")
    line = [l for l in p.stdout.splitlines() if "images/s" in l][-1]
    return float(line.split(": ")[1].split(" images/s")[0])


REFERENCE = r'''
import sys, time, torch, webdataset as wds
from torchvision import transforms
pattern, workers, res, batch, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tf = transforms.Compose([transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR),
                         transforms.RandomCrop(res), transforms.RandomHorizontalFlip(),
                         transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
ds = (wds.WebDataset(pattern, shardshuffle=False, empty_check=False).shuffle(64)
      .decode("pil").to_tuple("jpg", "txt").map_tuple(lambda im: tf(im.convert("RGB")), lambda t: t))
dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, persistent_workers=True)
for _ in dl:  # warm-up pass: workers started, page cache warm
    pass
t0 = time.perf_counter(); n = 0
for x, _ in dl:
    n += x.shape[0]
print(n / (time.perf_counter() - t0))
'''


def reference(workers):
    p = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", REFERENCE, pattern(), str(workers), str(RES), str(BATCH), str(IMAGES)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench_loader: the reference failed:\n{p.stderr[-3000:]}")
    return float(p.stdout.split()[-1])


def main():
    make_shards()
    results = []
    for w in WORKERS:
        rounds = []
        for _ in range(ROUNDS):
            a = sdkd(w)
            b = reference(w)
            rounds.append({"sdkd": a, "reference": b, "ratio": a / b})
            print(f"  workers {w}: sdkd {a:.1f} images/s, reference {b:.1f} images/s, {a / b:.2f}x", file=sys.stderr, flush=True)
        results.append({"workers": w, "rounds": rounds,
                        "sdkd": statistics.median(r["sdkd"] for r in rounds),
                        "reference": statistics.median(r["reference"] for r in rounds),
                        "ratio": statistics.median(r["ratio"] for r in rounds)})
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "loader.json").write_text(json.dumps(results, indent=1))
    print("| workers | sdkd images/s | webdataset + PIL + DataLoader images/s | sdkd / reference (median of rounds) | sdkd images/s per worker |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['sdkd']:.1f} | {r['reference']:.1f} | {r['ratio']:.2f}x | {r['sdkd'] / r['workers']:.1f} |")


if __name__ == "__main__":
    main()
