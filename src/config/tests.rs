//! The run YAML through `RunConfig::from_yaml`: defaults, key names and lines in errors, the
//! config hash.
use super::*;

const MINIMAL: &str = "teacher: /base/models/sd15\nstudent: bk_small\noutput_dir: runs/x\ndata:\n  path: data/set\n";

fn parse(text: &str) -> Result<RunConfig> {
    RunConfig::from_yaml(text, Path::new("/base"), "run.yaml")
}

fn err(text: &str) -> String {
    format!("{:#}", parse(text).expect_err("config should be rejected"))
}

#[test]
fn shard_keys_are_checked_and_leave_older_hashes_alone() {
    let c = parse(MINIMAL).unwrap();
    let data: Vec<String> = c.resume_identity()["data"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(data, ["cache", "center_crop", "on_bad_sample", "path", "random_flip", "resolution"], "configs without shard keys hash as before");
    let shards = MINIMAL.replace("  path: data/set\n", "  shards: laion/{00000..00009}.tar\n  filter: {aesthetic_score: \">= 6.5\"}\n  min_size: 256\n");
    let s = parse(&shards).unwrap();
    assert_eq!(s.data.shards.as_deref(), Some("/base/laion/{00000..00009}.tar"));
    assert_eq!(s.data.location(), Some(("/base/laion/{00000..00009}.tar".to_string(), "data.shards")));
    assert_ne!(s.config_hash(), c.config_hash());
    for (yaml, key) in [
        ("  filter: {aesthetic_score: \"high\"}\n", "data.filter.aesthetic_score"),
        ("  max_aspect: 0\n", "data.max_aspect"),
        ("  min_size: 0\n", "data.min_size"),
        ("  format: tiff\n", "data.format"),
        ("  caption: \" \"\n", "data.caption"),
        ("  path: d\n", "data.shards"),
        ("  format: imagefolder\n", "data.format"),
    ] {
        let base = MINIMAL.replace("  path: data/set\n", "  shards: laion/{00000..00009}.tar\n");
        let e = err(&format!("{base}{yaml}"));
        assert!(e.contains(key), "{yaml:?}: {e}");
    }
}

#[test]
fn defaults_follow_bk_sdm() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.teacher.as_deref(), Some(Path::new("/base/models/sd15")));
    // a relative teacher that does not exist and reads `org/name` is a hub id, kept as written
    let hub = parse(&MINIMAL.replace("/base/models/sd15", "models/sd15")).unwrap();
    assert_eq!(hub.teacher.as_deref(), Some(Path::new("models/sd15")));
    let path = parse(&MINIMAL.replace("/base/models/sd15", "./models/sd15")).unwrap();
    assert_eq!(path.teacher.as_deref(), Some(Path::new("/base/./models/sd15")));
    assert_eq!(c.output_dir, Path::new("/base/runs/x"));
    assert_eq!(c.data.path.as_deref(), Some(Path::new("/base/data/set")));
    assert_eq!((c.data.resolution, c.data.center_crop, c.data.random_flip), (512, true, true));
    assert_eq!(c.data.on_bad_sample, OnBadSample::Skip);
    assert_eq!(c.loss, LossWeights { task: 1.0, output_kd: 1.0, feature_kd: 1.0, ..Default::default() });
    assert_eq!(c.optim, OptimConfig::default());
    assert_eq!((c.optim.lr, c.optim.betas, c.optim.weight_decay, c.optim.eps), (5e-5, [0.9, 0.999], 0.01, 1e-8));
    assert_eq!(c.optim.max_grad_norm, Some(1.0));
    assert_eq!((c.optim.schedule, c.optim.warmup_steps), (Schedule::Constant, 0));
    let t = &c.train;
    assert_eq!((t.batch_size, t.grad_accum, t.max_steps, t.seed), (64, 4, 50_000, 42));
    assert_eq!((t.device, t.precision, t.ema_decay), (DeviceChoice::Auto, Precision::Bf16, None));
    assert_eq!((c.checkpoint.every, c.checkpoint.keep), (500, 3));
    assert_eq!((c.log.every, c.log.tensorboard), (10, true));
    assert_eq!((c.validation.every, c.validation.steps, c.validation.scheduler), (1000, 25, SchedulerKind::Unipc));
    assert_eq!(c.validation.prompts, vec!["a toy panda standing on a pile of broccoli"]);
    assert_eq!((c.student_init, c.distill), (StudentInit::Teacher, true));
}

#[test]
fn a_validation_scheduler_typo_is_refused_at_load() {
    let e = err(&format!("{MINIMAL}validation:\n  scheduler: unipcc\n"));
    assert!(e.contains("validation.scheduler") && e.contains("unipcc") && e.contains("line 7"), "{e}");
    assert_eq!(parse(&format!("{MINIMAL}validation:\n  scheduler: DDIM\n")).unwrap().validation.scheduler, SchedulerKind::Ddim);
}

#[test]
fn unknown_keys_name_the_key_and_line() {
    let e = err(&format!("{MINIMAL}  resolutoin: 256\n"));
    assert!(e.contains("resolutoin") && e.contains("line 6"), "{e}");
    let e = err(&format!("{MINIMAL}optimiser:\n  lr: 1.0\n"));
    assert!(e.contains("optimiser") && e.contains("line 6"), "{e}");
    let e = err(&format!("{MINIMAL}train:\n  batch: 3\n"));
    assert!(e.contains("batch") && e.contains("train"), "{e}");
}

#[test]
fn wrong_types_name_the_key() {
    for (yaml, key) in [
        ("train:\n  batch_size: big\n", "train.batch_size"),
        ("train:\n  batch_size: -1\n", "train.batch_size"),
        ("optim:\n  lr: fast\n", "optim.lr"),
        ("optim:\n  betas: [0.9]\n", "optim.betas"),
        ("optim:\n  schedule: step\n", "optim.schedule"),
        ("optim:\n  shard_state: 8\n", "optim.shard_state"),
        ("train:\n  precision: fp8\n", "train.precision"),
        ("train:\n  device: gpu\n", "train.device"),
        ("train:\n  device: cuda:x\n", "train.device"),
        ("data:\n  path: d\n  on_bad_sample: ignore\n", "data.on_bad_sample"),
        ("student_init: zeros\n", "student_init"),
        ("log:\n  tensorboard: sometimes\n", "log.tensorboard"),
        ("validation:\n  prompts: 3\n", "validation.prompts"),
    ] {
        // Later keys replace the minimal ones; serde_yaml refuses duplicates, so rebuild.
        let base: String = MINIMAL
            .lines()
            .filter(|l| !(yaml.starts_with("data:") && (l.starts_with("data:") || l.starts_with("  path"))))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = err(&format!("{base}{yaml}"));
        assert!(e.contains(key), "{yaml:?}: {e}");
        assert!(e.contains("line"), "{yaml:?}: no line in {e}");
    }
}

#[test]
fn out_of_range_values_name_key_and_value() {
    for (yaml, needle) in [
        ("optim:\n  lr: 0\n", "optim.lr = 0"),
        ("optim:\n  lr: -1.0e-4\n", "optim.lr = -0.0001"),
        ("optim:\n  betas: [0.9, 1.0]\n", "optim.betas[1] = 1"),
        ("optim:\n  betas: [-0.1, 0.9]\n", "optim.betas[0] = -0.1"),
        ("optim:\n  eps: 0\n", "optim.eps = 0"),
        ("optim:\n  weight_decay: -0.01\n", "optim.weight_decay = -0.01"),
        ("optim:\n  max_grad_norm: 0\n", "optim.max_grad_norm = 0"),
        ("optim:\n  warmup_steps: 11\ntrain:\n  max_steps: 10\n", "optim.warmup_steps = 11"),
        ("train:\n  batch_size: 0\n", "train.batch_size = 0"),
        ("train:\n  grad_accum: 0\n", "train.grad_accum = 0"),
        ("train:\n  max_steps: 0\n", "train.max_steps = 0"),
        ("train:\n  ema_decay: 1.0\n", "train.ema_decay = 1"),
        ("train:\n  ema_decay: 0\n", "train.ema_decay = 0"),
        ("train:\n  noise_offset: -0.1\n", "train.noise_offset = -0.1"),
        ("train:\n  dist_timeout_s: 0\n", "train.dist_timeout_s = 0"),
        ("loss:\n  feature_kd: -1\n", "loss.feature_kd = -1"),
        ("loss:\n  task: .nan\n", "loss.task = NaN"),
        ("loss:\n  task: 0\n  output_kd: 0\n  feature_kd: 0\n", "all 0"),
        ("checkpoint:\n  keep: 0\n", "checkpoint.keep = 0"),
        ("log:\n  every: 0\n", "log.every = 0"),
        ("validation:\n  steps: 0\n", "validation.steps = 0"),
        ("validation:\n  prompts: []\n", "validation.prompts"),
        ("validation:\n  guidance_scale: -1\n", "validation.guidance_scale = -1"),
        ("validation:\n  lcm_steps: [1, 0]\n", "validation.lcm_steps"),
    ] {
        let e = err(&format!("{MINIMAL}{yaml}"));
        assert!(e.contains(needle), "{yaml:?}: {e}");
        assert!(e.contains("run.yaml"), "{yaml:?}: no file in {e}");
    }
    let e = err("teacher: t\nstudent: bk_small\noutput_dir: o\ndata:\n  path: d\n  resolution: 500\n");
    assert!(e.contains("data.resolution = 500") && e.contains("(line 6)"), "{e}");
    let e = err(&format!("{MINIMAL}log:\n  tensorboard: true\n  # why not\n  every: 0\n"));
    assert!(e.contains("log.every = 0") && e.contains("(line 9)"), "{e}");
    let e = err("teacher: t\nstudent: bk_small\noutput_dir: o\ndata:\n  resolution: 512\n");
    assert!(e.contains("data.path") && e.contains("data.cache"), "{e}");
    // Validation off: an empty prompt list is fine.
    parse(&format!("{MINIMAL}validation:\n  every: 0\n  prompts: []\n")).unwrap();
}

#[test]
fn teacher_may_be_null_only_from_scratch() {
    let body = "student: bk_small\noutput_dir: o\ndata:\n  cache: c\nvalidation:\n  every: 0\n";
    assert!(err(body).contains("student_init"));
    assert!(err(&format!("{body}student_init: random\n")).contains("distill"));
    let c = parse(&format!("{body}student_init: random\ndistill: false\n")).unwrap();
    assert!(c.from_scratch() && c.teacher.is_none());
    let c = parse(&format!("teacher: null\n{body}student_init: random\ndistill: false\n")).unwrap();
    assert!(c.teacher.is_none());
    let no_cache = "student: bk_small\noutput_dir: o\ndata:\n  path: d\nvalidation:\n  every: 0\nstudent_init: random\ndistill: false\n";
    assert!(err(no_cache).contains("data.cache"));
    let with_val = "student: bk_small\noutput_dir: o\ndata:\n  cache: c\nstudent_init: random\ndistill: false\n";
    assert!(err(with_val).contains("validation.every"));
    // distill: false needs only the task weight.
    parse(&format!("{MINIMAL}distill: false\nloss:\n  output_kd: 0\n  feature_kd: 0\n")).unwrap();
    assert!(err(&format!("{MINIMAL}distill: false\nloss:\n  task: 0\n")).contains("loss.task = 0"));
}

#[test]
fn devices_and_paths() {
    for (s, d) in [
        ("auto", DeviceChoice::Auto),
        ("cpu", DeviceChoice::Cpu),
        ("cuda", DeviceChoice::Cuda(0)),
        ("cuda:3", DeviceChoice::Cuda(3)),
    ] {
        let c = parse(&format!("{MINIMAL}train:\n  device: {s}\n")).unwrap();
        assert_eq!(c.train.device, d);
    }
    assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    let c = parse("teacher: /abs/t\nstudent: specs/mine.yaml\noutput_dir: /abs/o\ndata:\n  cache: ../c\n").unwrap();
    assert_eq!(c.teacher.as_deref(), Some(Path::new("/abs/t")));
    assert_eq!(c.student, StudentChoice::Spec("/base/specs/mine.yaml".into()));
    assert_eq!(c.data.cache.as_deref(), Some(Path::new("/base/../c")));
    assert!(matches!(parse(MINIMAL).unwrap().student, StudentChoice::Preset { .. }));
}

#[test]
fn yaml_round_trip() {
    let c =
        parse(&format!("{MINIMAL}train:\n  ema_decay: 0.9999\n  device: cuda:1\noptim:\n  max_grad_norm: null\n"))
            .unwrap();
    let again = parse(&c.to_yaml().unwrap()).unwrap();
    assert_eq!(c, again);
    assert_eq!(again.optim.max_grad_norm, None);
}

#[test]
fn hash_ignores_resume_mutable_keys_only() {
    let a = parse(MINIMAL).unwrap();
    let h = a.config_hash();
    assert_eq!(h.len(), 16);
    assert_eq!(h, parse(MINIMAL).unwrap().config_hash(), "hash is deterministic");
    for extra in [
        "train:\n  max_steps: 7\n  device: cpu\n",
        "checkpoint:\n  every: 3\n  keep: 9\n",
        "log:\n  every: 1\n  tensorboard: false\n",
        "validation:\n  every: 0\n",
        "optim:\n  shard_state: true\n",
    ] {
        let b = parse(&format!("{MINIMAL}{extra}")).unwrap();
        assert_eq!(h, b.config_hash(), "{extra:?} must not change the hash");
    }
    let moved = parse(&MINIMAL.replace("runs/x", "runs/elsewhere")).unwrap();
    assert_eq!(h, moved.config_hash(), "output_dir must not change the hash");
    for extra in [
        "train:\n  seed: 1\n",
        "optim:\n  lr: 1.0e-4\n",
        "loss:\n  feature_kd: 0.5\n",
        "train:\n  batch_size: 8\n",
        "distill: false\n",
    ] {
        let b = parse(&format!("{MINIMAL}{extra}")).unwrap();
        assert_ne!(h, b.config_hash(), "{extra:?} must change the hash");
        let diff = identity_diff(&a.resume_identity(), &b.resume_identity());
        assert_eq!(diff.len(), 1, "{diff:?}");
    }
    let b = parse(&MINIMAL.replace("bk_small", "bk_tiny")).unwrap();
    let diff = identity_diff(&a.resume_identity(), &b.resume_identity());
    assert_eq!(diff, vec!["student: \"bk_small\" vs \"bk_tiny\"".to_string()]);
}

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let c = RunConfig::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(c.output_dir.is_absolute() && c.teacher.as_ref().unwrap().is_absolute());
            seen += 1;
        }
    }
    assert!(seen >= 4, "only {seen} example configs in {}", dir.display());
    for preset in ["base", "small", "tiny"] {
        let c = RunConfig::load(&dir.join(format!("sd15_bk_{preset}.yaml"))).unwrap();
        assert_eq!(c.student.to_string(), format!("bk_{preset}"));
        let t = &c.train;
        assert_eq!((t.batch_size, t.grad_accum, t.max_steps, t.precision), (64, 4, 50_000, Precision::Bf16));
        assert_eq!(
            (c.optim.lr, c.optim.schedule, c.data.resolution, c.checkpoint.every),
            (5e-5, Schedule::Constant, 512, 500)
        );
    }
    let tiny = RunConfig::load(&dir.join("tiny_cpu.yaml")).unwrap();
    assert_eq!((tiny.train.device, tiny.train.precision), (DeviceChoice::Cpu, Precision::Fp32));
    // diffusers' full-LCD recipe for SD-1.5 on the pruned student
    let lcm = RunConfig::load(&dir.join("sd15_bk_small_lcm.yaml")).unwrap();
    assert_eq!((lcm.method, lcm.student.to_string(), lcm.lcm.loss, lcm.lcm.target_ema), (Method::Lcm, "bk_small".to_string(), ConsistencyLoss::Huber, 0.95));
    assert_eq!((lcm.optim.lr, lcm.optim.weight_decay, lcm.train.batch_size, lcm.train.max_steps), (1e-6, 0.0, 12, 1000));
    assert_eq!(lcm.validation.lcm_steps, [1, 2, 4, 8]);
    // diffusers' full-LCD recipe for SDXL (train_lcm_distill_sdxl_wds.py) on SSD-1B's architecture
    let xl = RunConfig::load(&dir.join("sdxl_ssd_1b_lcm.yaml")).unwrap();
    assert_eq!((xl.method, xl.student.to_string(), xl.lcm.loss, xl.lcm.guidance_range()), (Method::Lcm, "ssd_1b".to_string(), ConsistencyLoss::Huber, (3.0, 15.0)));
    assert_eq!((xl.optim.lr, xl.optim.weight_decay, xl.train.batch_size, xl.train.max_steps, xl.data.resolution), (1e-6, 0.0, 12, 1000, 1024));
}

/// Every key set away from its default, for `config_hashes_are_unchanged`.
const EVERY_KEY: &str = "teacher: /base/models/sd15
student: specs/mine.yaml
output_dir: runs/x
student_init: random
distill: true
data:
  shards: laion/{00000..00009}.tar
  cache: cache/x
  resolution: 256
  center_crop: false
  random_flip: false
  on_bad_sample: fail
  format: webdataset
  caption: json.caption
  image_column: jpg
  min_size: 128
  max_aspect: 2.5
  filter: {aesthetic_score: \">= 6.5\", lang: \"== en\"}
  caption_dropout: 0.1
loss:
  task: 0.5
  output_kd: 0.25
  feature_kd: 2
optim:
  lr: 1.0e-4
  betas: [0.8, 0.99]
  weight_decay: 0.1
  eps: 1.0e-6
  max_grad_norm: null
  schedule: linear
  warmup_steps: 7
  state_dtype: bf16
  shard_state: true
train:
  batch_size: 3
  grad_accum: 5
  max_steps: 70
  seed: 9
  device: cuda:1
  precision: fp16
  ema_decay: 0.999
  noise_offset: 0.05
  dist_timeout_s: 60
  gradient_checkpointing: blocks
checkpoint:
  every: 11
  keep: 4
log:
  every: 2
  tensorboard: false
validation:
  every: 13
  prompts: [a, b]
  steps: 9
  scheduler: ddim
  guidance_scale: 3
  eval:
    every: 17
    prompts: captions.csv
    count: 20
    sample_seed: 5
    metrics: [fid, is, clip]
    real: real.npz
    inception: inception.pth
    clip: clip.bin
    scheduler: dpmpp_2m
    steps: 12
    guidance_scale: 4
    seed: 77
    seeding: per-image
    resolution: 64
    score_size: 0
    batch_size: 2
    ema: false
";

/// The config hash (and the resolved YAML a run writes) of every example config, the minimal
/// one and one that sets every key, pinned: a change here means existing checkpoints no longer
/// resume (`sdkd train --resume` refuses another hash).
/// `student` is read once into a `StudentChoice`: an alias stays as written (so its config hash
/// is that of its text), paths resolve against the config's folder, a bare folder name does not,
/// and an unknown or empty value is refused when the file loads, naming the line.
#[test]
fn student_is_parsed_once_and_written_back_as_given() {
    let alias = parse(&MINIMAL.replace("bk_small", "sd_small")).unwrap();
    assert_eq!(alias.student, StudentChoice::Preset { preset: crate::distill::student::Preset::BkBase, name: "sd_small" });
    assert!(alias.to_yaml().unwrap().contains("student: sd_small\n"));
    assert_ne!(alias.config_hash(), parse(&MINIMAL.replace("bk_small", "bk_base")).unwrap().config_hash());
    for (value, want) in [
        ("unets/s", StudentChoice::Config("/base/unets/s".into())),
        ("unets/s/config.json", StudentChoice::Config("/base/unets/s/config.json".into())),
        ("config.json", StudentChoice::Config("config.json".into())),
        ("mine.yml", StudentChoice::Spec("/base/mine.yml".into())),
        ("/abs/spec.yaml", StudentChoice::Spec("/abs/spec.yaml".into())),
    ] {
        assert_eq!(parse(&MINIMAL.replace("bk_small", value)).unwrap().student, want, "{value}");
    }
    let e = err(&MINIMAL.replace("bk_small", "bk_giant"));
    assert!(e.contains("unknown student preset \"bk_giant\"") && e.contains("line 2"), "{e}");
    let e = err(&MINIMAL.replace("bk_small", "\"\""));
    assert!(e.contains("student is empty") && e.contains("line 2"), "{e}");
}

#[test]
fn config_hashes_are_unchanged() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut cases: Vec<(String, String)> = vec![("MINIMAL".into(), MINIMAL.into()), ("EVERY_KEY".into(), EVERY_KEY.into())];
    for name in ["sd15_bk_base.yaml", "sd15_bk_small.yaml", "sd15_bk_tiny.yaml", "tiny_cpu.yaml"] {
        cases.push((name.into(), std::fs::read_to_string(dir.join(name)).unwrap()));
    }
    let got: Vec<String> = cases
        .iter()
        .map(|(name, text)| {
            let c = RunConfig::from_yaml(text, Path::new("/base"), name).unwrap_or_else(|e| panic!("{e:#}"));
            format!("{name} {} {:016x}", c.config_hash(), fnv1a64(c.to_yaml().unwrap().as_bytes()))
        })
        .collect();
    let want = [
        "MINIMAL a0b406d19256d50a 6db01be72b6c0e94",
        // its YAML gained `optim.shard_state: true`; its resume hash did not (a resume-mutable key)
        "EVERY_KEY 1ef96c816f2a7309 49a49ee3f99b3518",
        "sd15_bk_base.yaml 9dc4aec914d80480 ac3155815fc71e78",
        "sd15_bk_small.yaml c796625309546f14 5cc5b5da2df0746e",
        "sd15_bk_tiny.yaml 606422fdce7a1415 be10aa6864b27782",
        "tiny_cpu.yaml 0e99e5bc5c69024e 18e223a3afb1383a",
    ];
    assert_eq!(got, want);
}

/// A run's `config.yaml` as sdkd wrote it before its sections moved beside what they configure
/// (a `tests/` run of 2026-12-07), and the config hash its checkpoints recorded.
const RECORDED_YAML: &str = r#"teacher: /tmp/sdkd-test-KQcNDv/tiny
student: bk_small
output_dir: /tmp/sdkd-test-KQcNDv/run1
student_init: teacher
distill: true
data:
  path: /tmp/sdkd-test-KQcNDv/data
  cache: null
  resolution: 16
  center_crop: true
  random_flip: true
  on_bad_sample: skip
loss:
  task: 1.0
  output_kd: 1.0
  feature_kd: 1.0
optim:
  lr: 0.00005
  betas:
  - 0.9
  - 0.999
  weight_decay: 0.01
  eps: 1e-8
  max_grad_norm: 1.0
  schedule: constant
  warmup_steps: 0
  state_dtype: fp32
train:
  batch_size: 2
  grad_accum: 1
  max_steps: 4
  seed: 42
  device: cpu
  precision: fp32
  ema_decay: null
  noise_offset: 0.0
  dist_timeout_s: 1800.0
  gradient_checkpointing: none
checkpoint:
  every: 2
  keep: 10
log:
  every: 10
  tensorboard: true
validation:
  every: 0
  prompts:
  - a toy panda standing on a pile of broccoli
  steps: 25
  scheduler: unipc
  guidance_scale: 7.5
  eval:
    every: 0
    prompts: null
    count: 1000
    sample_seed: null
    metrics:
    - fid
    - is
    real: null
    inception: null
    clip: null
    scheduler: pndm
    steps: 25
    guidance_scale: 7.5
    seed: 1234
    seeding: consecutive
    resolution: null
    score_size: 256
    batch_size: 8
    ema: true
"#;
const RECORDED_HASH: &str = "21444c4370f76c3d";

/// The hash of a config written before the refactor is the hash its checkpoints hold (so they
/// resume), and the config serialises to the same YAML, byte for byte.
#[test]
fn a_recorded_run_keeps_its_hash_and_yaml() {
    let c = RunConfig::from_yaml(RECORDED_YAML, Path::new("/"), "config.yaml").unwrap();
    assert_eq!(c.config_hash(), RECORDED_HASH);
    assert_eq!(c.to_yaml().unwrap(), RECORDED_YAML);
}

#[test]
fn method_lcm_takes_its_section_and_refuses_what_it_does_not_use() {
    let c = parse(&format!("{MINIMAL}method: lcm\n")).unwrap();
    assert_eq!((c.method, &c.lcm), (Method::Lcm, &LcmConfig::default()));
    assert_eq!((c.lcm.num_ddim_timesteps, c.lcm.guidance_range(), c.lcm.time_cond_proj_dim), (50, (5.0, 15.0), 256));
    assert_eq!((c.lcm.timestep_scaling, c.lcm.target_ema, c.lcm.loss, c.lcm.huber_c), (10.0, 0.95, ConsistencyLoss::L2, 0.001));
    // method is part of the run's identity: a kd checkpoint does not resume an lcm run
    let kd = parse(MINIMAL).unwrap();
    assert_ne!(c.config_hash(), kd.config_hash());
    assert!(identity_diff(&kd.resume_identity(), &c.resume_identity()).iter().any(|d| d.starts_with("method")));
    let huber = parse(&format!("{MINIMAL}method: lcm\nlcm:\n  loss: huber\n  w_min: 3\n")).unwrap();
    assert_eq!((huber.lcm.loss, huber.lcm.w_min), (ConsistencyLoss::Huber, Some(3.0)));
    assert_ne!(huber.config_hash(), c.config_hash());
    for (yaml, key) in [
        ("lcm:\n  w_min: 16\n", "lcm.w_min"),
        ("lcm:\n  time_cond_proj_dim: 255\n", "lcm.time_cond_proj_dim"),
        ("lcm:\n  num_ddim_timesteps: 0\n", "lcm.num_ddim_timesteps"),
        ("lcm:\n  loss: l1\n", "l1"),
        ("lcm:\n  student_init: /nonexistent/kd-run\n", "lcm.student_init"),
        ("loss:\n  feature_kd: 2\n", "loss"),
        ("distill: false\n", "distill"),
        ("train:\n  noise_offset: 0.1\n", "train.noise_offset"),
    ] {
        let e = err(&format!("{MINIMAL}method: lcm\n{yaml}"));
        assert!(e.contains(key), "{yaml:?}: {e}");
    }
    // an lcm: section without method: lcm is a mistake, not ignored
    assert!(err(&format!("{MINIMAL}lcm:\n  w_min: 3\n")).contains("method"));
    assert!(err(&format!("{MINIMAL}validation:\n  lcm_steps: [4]\n")).contains("validation.lcm_steps"));
    assert!(err(&format!("{MINIMAL}method: lcd\n")).contains("lcd"));
}

/// Every recipe in configs/ loads (the LoRA ones before their base exists).
#[test]
fn every_config_in_configs_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut names = vec![];
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            RunConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    for recipe in ["lora_finetune_student.yaml", "lora_kd_student.yaml", "lcm_lora_bk_small.yaml", "tiny_cpu.yaml"] {
        assert!(names.iter().any(|n| n == recipe), "{recipe} missing from {names:?}");
    }
}

/// `lora:` takes diffusers' LCM-LoRA defaults, and its rules across sections name their key.
#[test]
fn lora_defaults_and_rules_across_sections() {
    let c = parse(&format!("{MINIMAL}lora:\n  rank: 8\n")).unwrap();
    let l = c.lora.as_ref().unwrap();
    assert_eq!((l.rank, l.alpha(), l.dropout, l.targets.len()), (8, 8.0, 0.0, 14));
    assert_eq!(l.targets[3], "to_out.0");
    assert_ne!(c.config_hash(), parse(MINIMAL).unwrap().config_hash());
    for (yaml, key) in [
        ("lora:\n  dropout: 0.1\ntrain:\n  gradient_checkpointing: attention\n", "lora.dropout"),
        ("lora: {}\ntrain:\n  ema_decay: 0.999\n", "train.ema_decay"),
        ("lora: {}\nstudent_init: random\n", "lora.base"),
        ("lora: {}\nmethod: lcm\nlcm:\n  target_ema: 0.5\n", "lcm.target_ema"),
        ("lora:\n  rank: -1\n", "lora.rank"),
        ("lora:\n  init: uniform\n", "init"),
    ] {
        let e = err(&format!("{MINIMAL}{yaml}"));
        assert!(e.contains(key), "{yaml:?}: {e}");
    }
}
