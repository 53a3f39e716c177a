"""huggingface_hub and diffusers as the referee of sdkd's hub support (tests/hub.rs).

usage:
  hub_check.py repo DIR          turn the pipeline folder DIR (make_pipeline.py's) into a hub repo's
                                 tree: fp16 variants of unet/vae/text_encoder (diffusers'
                                 save_pretrained(variant="fp16")), a .bin copy of the UNet, and a
                                 README.md whose header gives a license
  hub_check.py load ID REF_DIR   DiffusionPipeline.from_pretrained(ID, local_files_only=True) from the
                                 cache of HF_HUB_CACHE: every tensor of unet, vae and text_encoder
                                 equal to those of the folder REF_DIR; scan_cache_dir finds the repo
                                 and no warnings
  hub_check.py snapshot ID       huggingface_hub.snapshot_download(ID) from HF_ENDPOINT into HF_HUB_CACHE;
                                 prints the snapshot folder
  hub_check.py card README.md    the model card as huggingface_hub reads it: prints its metadata as JSON
  hub_check.py upload DIR REPO   HfApi.upload_folder(DIR, REPO) to HF_ENDPOINT (the LFS path, as with
                                 HF_HUB_DISABLE_XET=1): the server's upload protocol is the one
                                 huggingface_hub speaks
"""
import json
import os
import sys


def repo(d):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        m = cls.from_pretrained(os.path.join(d, sub)).to(torch.float16)
        m.save_pretrained(os.path.join(d, sub), variant="fp16", safe_serialization=True)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(d, "unet"))
    torch.save(unet.state_dict(), os.path.join(d, "unet", "diffusion_pytorch_model.bin"))
    with open(os.path.join(d, "README.md"), "w") as f:
        f.write("---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n\n# a tiny test pipeline\n")


def load(repo_id, ref_dir):
    import torch
    from diffusers import DiffusionPipeline
    from huggingface_hub import scan_cache_dir

    got = DiffusionPipeline.from_pretrained(repo_id, local_files_only=True)
    want = DiffusionPipeline.from_pretrained(ref_dir)
    n = 0
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(got, part).state_dict(), getattr(want, part).state_dict()
        assert set(a) == set(b), part
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{part}.{k}"
            n += 1
    assert got.tokenizer("a red cube").input_ids == want.tokenizer("a red cube").input_ids
    info = scan_cache_dir()
    assert not info.warnings, info.warnings
    repos = [r.repo_id for r in info.repos]
    assert repo_id in repos, repos
    print(json.dumps({"tensors": n}))


def main():
    cmd = sys.argv[1]
    if cmd == "repo":
        repo(sys.argv[2])
    elif cmd == "load":
        load(sys.argv[2], sys.argv[3])
    elif cmd == "snapshot":
        from huggingface_hub import snapshot_download

        print(snapshot_download(sys.argv[2]))
    elif cmd == "card":
        from huggingface_hub import ModelCard

        card = ModelCard.load(sys.argv[2])
        print(json.dumps(card.data.to_dict()))
    elif cmd == "upload":
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(sys.argv[3], exist_ok=True)
        print(api.upload_folder(folder_path=sys.argv[2], repo_id=sys.argv[3]))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
