"""References for tests/eval.rs: pytorch-fid and torch-fidelity on a random-weight TF Inception.

usage: eval_reference.py OUT_DIR [--weights-only]

Writes OUT_DIR/inception.pth (a random state dict in the published files' layout, saved with
torch.save; both packages' weight download is patched to load it), image folders a/ and b/
(small PNGs), and OUT_DIR/expected.json + expected.safetensors with
- pytorch-fid's InceptionV3([block]) features of the first images of a/ for each dims,
- calculate_fid_given_paths(a, b, dims=64) and the same with a/ saved as .npz (save_fid_stats),
- torch-fidelity's inception-v3-compat 2048 features and logits_unbiased, and its ISC on a/,
- isc_features_to_metric on random logits and numpy's RandomState(2020).permutation.
With --weights-only it writes just OUT_DIR/inception.pth (the random network, unfitted head) and
stops: a cheap network for tests that compare sdkd with itself.
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

torch.set_num_threads(2)
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)

import pytorch_fid.inception as pfi  # noqa: E402
from pytorch_fid.fid_score import calculate_fid_given_paths, save_fid_stats  # noqa: E402

# a random state dict with the published layout: conv weights scaled to keep activations O(1),
# batch-norm statistics perturbed so that every parameter matters
pfi.load_state_dict_from_url = lambda *a, **k: {}
net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
for name, blk in [("Mixed_5b", pfi.FIDInceptionA(192, 32)), ("Mixed_5c", pfi.FIDInceptionA(256, 64)),
                  ("Mixed_5d", pfi.FIDInceptionA(288, 64)), ("Mixed_6b", pfi.FIDInceptionC(768, 128)),
                  ("Mixed_6c", pfi.FIDInceptionC(768, 160)), ("Mixed_6d", pfi.FIDInceptionC(768, 160)),
                  ("Mixed_6e", pfi.FIDInceptionC(768, 192)), ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                  ("Mixed_7c", pfi.FIDInceptionE_2(2048))]:
    setattr(net, name, blk)
sd = {}
for k, v in net.state_dict().items():
    if k.endswith("conv.weight"):
        fan_in = v[0].numel()
        v = torch.randn_like(v) * (2.0 / fan_in) ** 0.5
    elif k.endswith("bn.weight"):
        v = 1.0 + 0.2 * torch.randn_like(v)
    elif k.endswith("bn.bias"):
        v = 0.2 * torch.randn_like(v)
    elif k.endswith("running_mean"):
        v = 0.1 * torch.randn_like(v)
    elif k.endswith("running_var"):
        v = 1.0 + 0.5 * torch.rand_like(v)
    elif k == "fc.weight":
        v = torch.randn_like(v) * 0.05  # replaced below
    elif k == "fc.bias":
        v = torch.randn_like(v) * 0.1
    sd[k] = v
weights = os.path.join(out, "inception.pth")
torch.save(sd, weights)
if "--weights-only" in sys.argv:
    sys.exit(0)
pfi.load_state_dict_from_url = lambda *a, **k: torch.load(weights)

# image folders: smooth random colour fields (a) and a shifted distribution (b)
rng = np.random.default_rng(5)
for folder, n, shift in [("a", 70, 0.0), ("b", 66, 80.0)]:
    d = os.path.join(out, folder)
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
        img = Image.fromarray(base.astype(np.uint8)).resize((24, 24), Image.BILINEAR)
        px = np.clip(np.asarray(img, dtype=np.float32) + shift + rng.normal(0, 8, (24, 24, 3)), 0, 255)
        Image.fromarray(px.astype(np.uint8)).save(os.path.join(d, f"{i:03d}.png"))
files_a = sorted(os.listdir(os.path.join(out, "a")))
is_dir = os.path.join(out, "is")
os.makedirs(is_dir, exist_ok=True)
for f in files_a[:12]:
    Image.open(os.path.join(out, "a", f)).save(os.path.join(is_dir, f))

# A random head gives near-uniform class probabilities that hardly change between images (IS
# 1.00001), which would test nothing: project out the features' mean direction (whitened) so that
# the 1008 logits vary between the IS images by a few units.
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402


def u8_batch(folder, names):
    return torch.stack([torch.from_numpy(np.asarray(Image.open(os.path.join(folder, f)).convert("RGB"))).permute(2, 0, 1)
                        for f in names])


fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
with torch.no_grad():
    (feats,) = fe(u8_batch(is_dir, sorted(os.listdir(is_dir))))
scale = 1.0 / (feats.std(0) + 1e-6)
g = feats * scale
m_hat = g.mean(0) / g.mean(0).norm()
proj = torch.eye(2048) - torch.outer(m_hat, m_hat)
head = torch.randn(1008, 2048) @ proj * scale.unsqueeze(0)
spread = (feats @ head.T).std(0).mean()
sd["fc.weight"] = head * (3.0 / spread)
torch.save(sd, weights)

expected, tensors = {}, {}
# pytorch-fid features of the first 3 images, every dims
import torchvision.transforms.functional as TF  # noqa: E402
batch = torch.stack([TF.to_tensor(Image.open(os.path.join(out, "a", f)).convert("RGB")) for f in files_a[:3]])
for dims in [64, 192, 768, 2048]:
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()
    with torch.no_grad():
        pred = model(batch)[0]
    if pred.size(2) != 1 or pred.size(3) != 1:
        pred = torch.nn.functional.adaptive_avg_pool2d(pred, output_size=(1, 1))
    tensors[f"pytorch_fid/{dims}"] = pred.squeeze(3).squeeze(2).contiguous()

a, b = os.path.join(out, "a"), os.path.join(out, "b")
expected["fid64"] = float(calculate_fid_given_paths([a, b], 50, "cpu", 64, num_workers=0))
save_fid_stats([a, os.path.join(out, "a_stats64.npz")], 50, "cpu", 64, num_workers=0)
expected["fid64_npz"] = float(calculate_fid_given_paths([os.path.join(out, "a_stats64.npz"), b], 50, "cpu", 64,
                                                        num_workers=0))

# torch-fidelity: the compat extractor on the same 3 images, then ISC on 12 images of a/
import torch_fidelity  # noqa: E402
from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: E402
fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                 feature_extractor_weights_path=weights)
u8 = u8_batch(os.path.join(out, "a"), files_a[:3])
with torch.no_grad():
    f2048, logits = fe(u8)
tensors["fidelity/2048"], tensors["fidelity/logits_unbiased"] = f2048, logits
m = torch_fidelity.calculate_metrics(input1=is_dir, isc=True, cuda=False, verbose=False, save_cpu_ram=True,
                                     feature_extractor_weights_path=weights, batch_size=12)
expected["is_mean"], expected["is_std"] = m["inception_score_mean"], m["inception_score_std"]

# the IS arithmetic and numpy's permutation, on random logits
g = torch.Generator().manual_seed(3)
rand_logits = torch.randn(53, 1008, generator=g) * 3
tensors["random_logits"] = rand_logits
r = isc_features_to_metric(rand_logits, splits=10, shuffle=True, rng_seed=2020)
expected["random_is"] = [r["inception_score_mean"], r["inception_score_std"]]
expected["perm"] = {str(n): np.random.RandomState(2020).permutation(n).tolist() for n in [1, 12, 53, 1000]}

save_file(tensors, os.path.join(out, "expected.safetensors"))
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump(expected, f)
print(json.dumps({k: v for k, v in expected.items() if k != "perm"}))
