use super::*;
use crate::models::layers::Init;
use crate::models::unet::UNet;
use serde_json::json;
use tch::{Device, Kind, Tensor};

fn config(xl: bool) -> UNetConfig {
    let mut c = json!({
        "block_out_channels": [8, 16], "layers_per_block": 1, "cross_attention_dim": 8,
        "norm_num_groups": 4, "attention_head_dim": 2, "sample_size": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    });
    if xl {
        c["addition_embed_type"] = json!("text_time");
        c["addition_time_embed_dim"] = json!(4);
        c["projection_class_embeddings_input_dim"] = json!(8 + 6 * 4);
    }
    UNetConfig::from_json(&c).unwrap()
}

fn unet(xl: bool) -> (UNetConfig, UNet) {
    let c = config(xl);
    tch::manual_seed(0);
    let u = UNet::build(&c, Device::Cpu, Kind::Float, Init::Torch);
    (c, u)
}

const MODULES: [&str; 4] = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.1.resnets.0.conv_shortcut",
];

/// Adapters of ranks 2 and 3 (alpha 4 and 1.5) on a linear, a 1×1 conv, a 3×3 conv and a 1×1
/// shortcut, shaped from the weights in `u`.
fn sample_set(u: &UNet) -> LoraSet {
    let vars = u.vs.variables();
    let mut set = LoraSet::new();
    for (i, m) in MODULES.iter().enumerate() {
        let w = vars[&format!("{m}.weight")].size();
        let r = 2 + (i as i64 % 2);
        let mut down = vec![r, w[1]];
        down.extend_from_slice(&w[2..]);
        let up: Vec<i64> = if w.len() == 4 { vec![w[0], r, 1, 1] } else { vec![w[0], r] };
        let alpha = if i % 2 == 0 { 4.0 } else { 1.5 };
        set.insert(Component::Unet, *m, Adapter::new(Tensor::randn(&down, (Kind::Float, Device::Cpu)), Tensor::randn(&up, (Kind::Float, Device::Cpu)), alpha));
    }
    set
}

fn same(a: &LoraSet, b: &LoraSet) {
    assert_eq!(a.len(), b.len());
    for (c, p, x) in a.iter() {
        let y = b.get(c, p).unwrap_or_else(|| panic!("{p} missing"));
        assert!(x.down.equal(&y.down) && x.up.equal(&y.up), "{p}");
        assert_eq!(x.alpha, y.alpha, "{p}");
    }
}

#[test]
fn both_layouts_round_trip_sd1_and_sdxl() {
    let dir = tempfile::tempdir().unwrap();
    for xl in [false, true] {
        let (c, u) = unet(xl);
        let targets = Targets::new(&c, &u.vs.variables());
        let set = sample_set(&u);
        for layout in [Layout::Diffusers, Layout::Kohya] {
            let path = dir.path().join(format!("{xl}-{}.safetensors", layout.name()));
            set.write(&path, layout, &c).unwrap();
            let names: Vec<String> = crate::models::weights::read_all(&path).unwrap().into_iter().map(|(n, _)| n).collect();
            assert_eq!(Layout::detect(&names).unwrap(), layout);
            if layout == Layout::Kohya {
                // sd-scripts' names: diffusers' for SD-1.x, SGM's for SDXL
                let key = if xl { "lora_unet_input_blocks_1_1_proj_in.alpha" } else { "lora_unet_down_blocks_0_attentions_0_proj_in.alpha" };
                assert!(names.iter().any(|n| n == key), "{names:?}");
            }
            same(&set, &LoraSet::read(&path, &targets).unwrap());
        }
    }
}

fn write_raw(path: &std::path::Path, tensors: &[(&str, Tensor)], meta: &[(&str, &str)]) {
    let t: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.to_string(), t.shallow_clone())).collect();
    let m = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    crate::models::weights::save_with_metadata(path, &t, None, &m).unwrap();
}

fn read_err(path: &std::path::Path, targets: &Targets) -> String {
    format!("{:#}", LoraSet::read(path, targets).unwrap_err())
}

#[test]
fn alpha_from_peft_metadata_patterns_or_rank() {
    let (c, u) = unet(false);
    let targets = Targets::new(&c, &u.vs.variables());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.safetensors");
    let q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k";
    let t = |s: &[i64]| Tensor::ones(s, (Kind::Float, Device::Cpu));
    let tensors = [
        (&*format!("{q}.lora_A.weight"), t(&[4, 8])),
        (&*format!("{q}.lora_B.weight"), t(&[8, 4])),
        (&*format!("{k}.lora_A.weight"), t(&[2, 8])),
        (&*format!("{k}.lora_B.weight"), t(&[8, 2])),
    ];
    write_raw(&p, &tensors, &[]);
    let set = LoraSet::read(&p, &targets).unwrap();
    assert_eq!(set.get(Component::Unet, &q[5..]).unwrap().alpha, 4.0, "no metadata: alpha = r");
    let meta = r#"{"unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_k": 3}, "unet.r": 4}"#;
    write_raw(&p, &tensors, &[("lora_adapter_metadata", meta)]);
    let set = LoraSet::read(&p, &targets).unwrap();
    assert_eq!(set.get(Component::Unet, &q[5..]).unwrap().scaling(), 2.0);
    assert_eq!(set.get(Component::Unet, &k[5..]).unwrap().alpha, 3.0);
}

#[test]
fn refusals_name_the_file_and_key() {
    let (c, u) = unet(false);
    let targets = Targets::new(&c, &u.vs.variables());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.safetensors");
    let t = |s: &[i64]| Tensor::ones(s, (Kind::Float, Device::Cpu));
    let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let kq = format!("lora_unet_{}", q.replace('.', "_"));
    write_raw(&p, &[(&*format!("unet.{q}.lora_A.weight"), t(&[2, 8])), (&*format!("unet.{q}.lora_B.weight"), t(&[8, 2])), (&*format!("{kq}.lora_down.weight"), t(&[2, 8]))], &[]);
    let e = read_err(&p, &targets);
    assert!(e.contains("bad.safetensors") && e.contains("mixes") && e.contains(&kq), "{e}");
    let nan = t(&[8, 2]) * f64::NAN;
    write_raw(&p, &[(&*format!("{kq}.lora_down.weight"), t(&[2, 8])), (&*format!("{kq}.lora_up.weight"), nan)], &[]);
    let e = read_err(&p, &targets);
    assert!(e.contains(&format!("key {kq}.lora_down.weight")) && e.contains("NaN"), "{e}");
    // an SD-1.5 layer this tiny UNet does not have, and a shape of another width
    let other = "lora_unet_down_blocks_2_attentions_1_proj_in";
    write_raw(&p, &[(&*format!("{other}.lora_down.weight"), t(&[2, 8])), (&*format!("{other}.lora_up.weight"), t(&[8, 2]))], &[]);
    let e = read_err(&p, &targets);
    assert!(e.contains(other) && e.contains("no layer"), "{e}");
    write_raw(&p, &[(&*format!("unet.{q}.lora_A.weight"), t(&[2, 320])), (&*format!("unet.{q}.lora_B.weight"), t(&[8, 2]))], &[]);
    let e = read_err(&p, &targets);
    assert!(e.contains(&format!("key unet.{q}.lora_A.weight")) && e.contains("[8, 320]") && e.contains("[8, 8]"), "{e}");
    write_raw(&p, &[(&*format!("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"), t(&[2, 8])), (&*format!("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"), t(&[8, 2]))], &[]);
    let e = read_err(&p, &targets);
    assert!(e.contains("no text_encoder"), "{e}");
}

/// PEFT's conv delta (conv2d of Aᵀ with B, transposed back) is B·A over the rank for each tap.
#[test]
fn conv_delta_is_b_times_a_per_tap() {
    let a = Tensor::randn([3, 5, 3, 3], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([7, 3, 1, 1], (Kind::Float, Device::Cpu));
    let lora = Adapter::new(a.shallow_clone(), b.shallow_clone(), 6.0);
    let d = lora.delta(0.5, Device::Cpu);
    let want = Tensor::einsum("or,rikl->oikl", &[b.squeeze_dim(3).squeeze_dim(2), a], None::<i64>) * 1.0;
    assert_eq!(d.size(), [7, 5, 3, 3]);
    assert!(d.allclose(&want, 1e-5, 1e-5, false));
}

#[test]
fn scale_argument() {
    let p = |s: &str| ScaledLora::parse(std::path::Path::new(s));
    assert_eq!(p("style.safetensors:0.8").unwrap(), ScaledLora { path: "style.safetensors".into(), scale: 0.8 });
    assert_eq!(p("style.safetensors").unwrap().scale, 1.0);
    assert_eq!(p("a/b.safetensors:-1").unwrap().scale, -1.0);
    for bad in ["style.safetensors:abc", "style.safetensors:nan", "s.safetensors:"] {
        let e = format!("{:#}", p(bad).unwrap_err());
        assert!(e.contains(bad), "{e}");
    }
}

/// Fusing adds the delta to the layer's weight and leaves the other weights as they were.
#[test]
fn fuse_adds_the_delta() {
    let (_, u) = unet(false);
    let set = sample_set(&u);
    let before: Vec<(String, Tensor)> = crate::models::weights::named_tensors(&u.vs).into_iter().map(|(n, t)| (n, t.copy())).collect();
    assert_eq!(fuse_into(&u.vs.variables(), &set, Component::Unet, 0.5).unwrap(), MODULES.len());
    let after = u.vs.variables();
    for (name, w) in before {
        let module = name.strip_suffix(".weight").unwrap_or("");
        match set.get(Component::Unet, module) {
            Some(a) => assert!(after[&name].equal(&(&w + a.delta(0.5, Device::Cpu))), "{name}"),
            None => assert!(after[&name].equal(&w), "{name} changed"),
        }
    }
}
