"""Writes an imagefolder's samples (metadata.jsonl order) with the reference writers users have:
webdataset's TarWriter (img2dataset's layout: KEY.png, KEY.txt, KEY.json; KEY = shard id then
index in the shard) and Hugging Face `datasets` parquet (an Image feature {bytes, path} and a
text column), plus a corrupted copy of each:

  bad-wds/      shard 00000: one sample without a caption (no .txt, no caption in its json),
                one whose .jpg member is garbage; shard 00001 (the last) truncated halfway
                through its last image
  bad-parquet/  one row whose image bytes are null (pyarrow)

Prints {"wds": [...], "parquet": [...]}: the (shard file, key) of every sample that must be
skipped.

usage: make_shards.py IMAGEFOLDER OUT PER_SHARD
"""
import io
import json
import os
import sys
import tarfile

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds


def rows(folder):
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                with open(os.path.join(folder, r["file_name"]), "rb") as img:
                    yield r["file_name"], img.read(), r["text"]


def write_wds(samples, out, per_shard, edit=None):
    os.makedirs(out, exist_ok=True)
    for start in range(0, len(samples), per_shard):
        s = start // per_shard
        with wds.TarWriter(os.path.join(out, f"{s:05d}.tar")) as sink:
            for i, (name, png, text) in enumerate(samples[start : start + per_shard]):
                key = f"{s:05d}{i:04d}"
                from PIL import Image

                w, h = Image.open(io.BytesIO(png)).size
                sample = {
                    "__key__": key,
                    "png": png,
                    "txt": text,
                    "json": {"caption": text, "key": key, "status": "success", "width": w, "height": h, "aesthetic": i % 4},
                }
                if edit:
                    sample = edit(s, i, sample)
                sink.write(sample)


def write_parquet(samples, out, per_file):
    os.makedirs(out, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    n = (len(samples) + per_file - 1) // per_file
    for k in range(n):
        part = samples[k * per_file : (k + 1) * per_file]
        ds = datasets.Dataset.from_dict(
            {"image": [{"bytes": png, "path": name} for name, png, _ in part], "text": [t for _, _, t in part]},
            features=features,
        )
        ds.to_parquet(os.path.join(out, f"train-{k:05d}-of-{n:05d}.parquet"))


def main():
    folder, out, per_shard = sys.argv[1], sys.argv[2], int(sys.argv[3])
    samples = list(rows(folder))
    write_wds(samples, os.path.join(out, "wds"), per_shard)
    write_parquet(samples, os.path.join(out, "parquet"), per_shard)

    skips = {"wds": [], "parquet": []}
    last_shard = (len(samples) - 1) // per_shard

    def corrupt(s, i, sample):
        if s == 0 and i == 2:
            del sample["txt"]
            sample["json"] = {k: v for k, v in sample["json"].items() if k != "caption"}
            skips["wds"].append(["00000.tar", sample["__key__"]])
        if s == 0 and i == 5:
            del sample["png"]
            sample["jpg"] = b"\xff\xd8\xff\xe0 this is not a JPEG at all"
            skips["wds"].append(["00000.tar", sample["__key__"]])
        return sample

    bad = os.path.join(out, "bad-wds")
    write_wds(samples, bad, per_shard, corrupt)
    last = os.path.join(bad, f"{last_shard:05d}.tar")
    with tarfile.open(last) as t:
        member = [m for m in t.getmembers() if m.name.endswith(".png")][-1]
    with open(last, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)
    skips["wds"].append([f"{last_shard:05d}.tar", member.name.split(".")[0]])

    os.makedirs(os.path.join(out, "bad-parquet"), exist_ok=True)
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": None if i == 3 else png, "path": name} for i, (name, png, _) in enumerate(samples)],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "text": [t for _, _, t in samples],
        }
    )
    pq.write_table(table, os.path.join(out, "bad-parquet", "train-00000-of-00001.parquet"), row_group_size=7)
    skips["parquet"].append(["train-00000-of-00001.parquet", "3"])
    print(json.dumps(skips))


if __name__ == "__main__":
    main()
