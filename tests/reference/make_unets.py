"""Tiny random diffusers UNets with every weight perturbed, and their outputs and block features
on fixed inputs, for sdkd's parity tests.

usage: make_unets.py OUT_DIR

For each model NAME it writes OUT_DIR/NAME/unet/ (a diffusers UNet folder) and
OUT_DIR/NAME/ref.safetensors holding the inputs (`sample`, `timesteps`, `context`), the
prediction (`out`) and block features (`feat.down_blocks.0`, `feat.mid_block`, ...,
`feat.down_blocks.2.attentions.0.proj_out`), all fp32. A down block's feature is its hidden
state (output[0]), as BK-SDM hooks it. OUT_DIR/NAME/unet_fp16/ holds the same weights as an fp16
variant (exactly representable in fp16, so the same outputs); OUT_DIR/NAME/unet_bf16/ holds them
rounded to bf16 as a bf16 variant, with ref_bf16.safetensors: the prediction and features of that
folder as diffusers loads it (variant="bf16", torch_dtype=float32), on the same inputs.
"""
import copy, os, sys
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

out_dir = sys.argv[1]
torch.manual_seed(0)

BASE = dict(sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=32)
MODELS = {
    # SD-1.x-like: conv projections, one head count for all stages, sharded weights
    "sd1": dict(BASE, block_out_channels=[32, 32, 64, 64], layers_per_block=2, attention_head_dim=2,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
    # SD-2.x-like: linear projections, per-stage heads, upcast attention, wider context
    "sd2": dict(BASE, block_out_channels=[32, 32, 64, 64], layers_per_block=2, attention_head_dim=[1, 2, 4, 4],
                cross_attention_dim=48, use_linear_projection=True, upcast_attention=True,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
    # BK-SDM-Small-like: one layer per block, no mid block
    "lpb1_nomid": dict(BASE, block_out_channels=[32, 32, 64, 64], layers_per_block=1, attention_head_dim=2,
                       mid_block_type=None,
                       down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                       up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
    # BK-SDM-Tiny-like: three stages, all cross-attention, per-stage layers list
    "three_stage": dict(BASE, block_out_channels=[32, 64, 64], layers_per_block=[2, 1, 1], attention_head_dim=4,
                        down_block_types=["CrossAttnDownBlock2D"] * 3,
                        up_block_types=["CrossAttnUpBlock2D"] * 3, freq_shift=1, flip_sin_to_cos=False),
}
INNER = ["down_blocks.0.attentions.0.proj_out", "down_blocks.1.attentions.0.proj_out", "up_blocks.1.attentions.0.proj_out"]


def perturb(model):
    # default init leaves zero out-projections and unit norms that hide bugs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def features(model, sample, t, ctx):
    feats, hooks = {}, []
    def hook(name):
        def f(_m, _i, out):
            feats[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return f
    for i, b in enumerate(model.down_blocks):
        hooks.append(b.register_forward_hook(hook(f"down_blocks.{i}")))
    if model.mid_block is not None:
        hooks.append(model.mid_block.register_forward_hook(hook("mid_block")))
    for i, b in enumerate(model.up_blocks):
        hooks.append(b.register_forward_hook(hook(f"up_blocks.{i}")))
    names = dict(model.named_modules())
    for n in INNER:
        if n in names:
            hooks.append(names[n].register_forward_hook(hook(n)))
    with torch.no_grad():
        out = model(sample, t, encoder_hidden_states=ctx).sample
    for h in hooks:
        h.remove()
    return out, feats


for name, cfg in MODELS.items():
    model = UNet2DConditionModel(**cfg).eval()
    perturb(model)
    # weights exactly representable in fp16, so an fp16 file loaded into fp32 gives the same model
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    d = os.path.join(out_dir, name)
    model.save_pretrained(os.path.join(d, "unet"), safe_serialization=True,
                          max_shard_size="300KB" if name == "sd1" else "10GB")
    model.half().save_pretrained(os.path.join(d, "unet_fp16"), variant="fp16", safe_serialization=True)
    model.float()
    # a copy: to() converts in place, and bf16 rounding would change the fp32 model
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(os.path.join(d, "unet_bf16"), variant="bf16",
                                                           safe_serialization=True)
    size = (18, 14) if name == "sd1" else (16, 16)  # sd1 also exercises odd skip sizes
    sample = torch.randn(2, 4, *size)
    t = torch.tensor([10, 900], dtype=torch.int64)
    ctx = torch.randn(2, 7, cfg["cross_attention_dim"])
    out, feats = features(model, sample, t, ctx)
    tensors = {"sample": sample, "timesteps": t, "context": ctx, "out": out}
    tensors.update({f"feat.{k}": v.contiguous() for k, v in feats.items()})
    save_file(tensors, os.path.join(d, "ref.safetensors"))
    bf16 = UNet2DConditionModel.from_pretrained(os.path.join(d, "unet_bf16"), variant="bf16",
                                                torch_dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    out, feats = features(bf16, sample, t, ctx)
    tensors = {"sample": sample, "timesteps": t, "context": ctx, "out": out}
    tensors.update({f"feat.{k}": v.contiguous() for k, v in feats.items()})
    save_file(tensors, os.path.join(d, "ref_bf16.safetensors"))
    print(name, sum(p.numel() for p in model.parameters()))
