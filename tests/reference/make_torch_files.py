"""Writes the torch.save files tests/torch_pickle.rs reads, with the expected tensors beside them.

usage: make_torch_files.py OUT_DIR

Each `<name>.pth` comes with `<name>.expected.safetensors` (the same tensors, contiguous, by the
dotted name sdkd should give them) and `expected.json` records strides, offsets and scalars.
"""
import collections
import json
import os
import sys

import torch
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(0)
meta = {}


def expect(name, tensors):
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, os.path.join(out, name + ".expected.safetensors"))


# every dtype torch.save writes through a typed storage, plus float8 (the _rebuild_tensor_v3 form)
dtypes = {
    "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64,
    "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8, "u8": torch.uint8,
}
d = {k: (torch.randn(3, 5) * 50).to(dt) for k, dt in dtypes.items()}
d["bool"] = torch.randn(4, 2) > 0
d["scalar"] = torch.tensor(2.5)
d["empty"] = torch.zeros(0, 3)
torch.save(d, os.path.join(out, "dtypes.pth"))
expect("dtypes", d)
f8 = {"f8": torch.randn(6).to(torch.float8_e4m3fn)}
torch.save(f8, os.path.join(out, "float8.pth"))
expect("float8", {"f8": f8["f8"].float()})

# views: a transpose, an offset slice with a step, and two views sharing one storage
base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
views = {"t": base.t(), "slice": base[2:, 1::3], "row": base[4], "base": base}
torch.save(views, os.path.join(out, "views.pth"))
expect("views", views)
meta["views"] = {k: {"stride": list(v.stride()), "offset": v.storage_offset(), "size": list(v.shape)} for k, v in views.items()}

# a module's state dict (OrderedDict with _metadata, Parameters) nested in a dict, protocol 4
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 2))
nested = {"model": {"unet": net.state_dict(), "extra": [torch.ones(2), torch.zeros(1)]}, "name": "tiny"}
torch.save(nested, os.path.join(out, "nested.pth"), pickle_protocol=4)
flat = {f"model.unet.{k}": v for k, v in net.state_dict().items()}
flat["model.extra.0"] = torch.ones(2)
flat["model.extra.1"] = torch.zeros(1)
expect("nested", flat)

# Lightning's checkpoint layout
sd = collections.OrderedDict((f"model.diffusion_model.{k}", v) for k, v in net.state_dict().items())
ckpt = {
    "epoch": 1, "global_step": 3, "pytorch-lightning_version": "1.4.2", "state_dict": sd,
    "hyper_parameters": {"lr": 1e-4, "betas": (0.9, 0.999), "ema": True, "none": None, "big": 2**70, "neg": -7,
                         "blob": b"\x00\xffab"},
    "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}}],
}
torch.save(ckpt, os.path.join(out, "lightning.ckpt"))
expect("lightning", dict(sd))

# refused: the legacy format, a truncated file, a pickle calling os.system
torch.save({"a": torch.ones(2)}, os.path.join(out, "legacy.pth"), _use_new_zipfile_serialization=False)
good = open(os.path.join(out, "views.pth"), "rb").read()
open(os.path.join(out, "truncated.pth"), "wb").write(good[: len(good) // 2])
marker = os.path.join(out, "MARKER")


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))


torch.save({"weight": torch.ones(2), "evil": Evil()}, os.path.join(out, "evil.pth"))
assert not os.path.exists(marker)

json.dump(meta, open(os.path.join(out, "expected.json"), "w"))
