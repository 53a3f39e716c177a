"""Checks a pruned student folder with diffusers and saves its reference outputs.

usage: check_pruned.py TEACHER_UNET_DIR STUDENT_UNET_DIR OUT.safetensors

Fails unless diffusers loads the student with no missing, unexpected or mis-shaped keys and every
student tensor equals its teacher source under the student's copy_map.json. Then saves fixed
inputs (`sample`, `timesteps`, `context`) and diffusers' prediction (`out`) for sdkd to match.
"""
import json, os, sys
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

teacher_dir, student_dir, out_path = sys.argv[1:4]
student, info = UNet2DConditionModel.from_pretrained(student_dir, output_loading_info=True)
for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info.get(key), f"{key}: {info[key]}"
teacher = UNet2DConditionModel.from_pretrained(teacher_dir)
t_state, s_state = teacher.state_dict(), student.state_dict()
copy_map = json.load(open(os.path.join(student_dir, "copy_map.json")))
assert set(copy_map) == set(s_state), "copy map covers exactly the student's tensors"
for s_name, t_name in copy_map.items():
    assert torch.equal(s_state[s_name], t_state[t_name]), f"{s_name} != teacher {t_name}"
torch.manual_seed(1)
sample = torch.randn(2, 4, 16, 16)
t = torch.tensor([3, 777])
ctx = torch.randn(2, 5, student.config.cross_attention_dim)
with torch.no_grad():
    out = student(sample, t, encoder_hidden_states=ctx).sample
save_file({"sample": sample, "timesteps": t, "context": ctx, "out": out}, out_path)
print(json.dumps({"params": sum(p.numel() for p in student.parameters()), "tensors": len(s_state)}))
