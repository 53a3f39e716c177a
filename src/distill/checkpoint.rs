//! Training checkpoints, split as burn splits them:
//! - *what*: `TrainState` — student, EMA, LCD target network and optimizer tensors by name, plus `StateMeta` (step,
//!   epoch, data cursor, seed, config hash) and the student's diffusers `unet/config.json`;
//! - *where*: `CheckpointWriter` — `<output_dir>/checkpoints/step-<N>/`, written by
//!   `fs_safe::write_dir` (a hidden temp folder, every file and folder fsynced, then renamed), so
//!   a step folder is complete or absent even after `kill -9` or a power cut;
//! - *when*: `checkpoints_to_delete`, the keep-last-K policy as a pure function, applied to the
//!   current run's checkpoints only.
//!
//! `state.json` is written last and lists every file with its size: a folder is a complete
//! checkpoint exactly when its `state.json` parses and every listed file is there with that size.
//! It also records each file's CRC-32, checked when a run resumes from the checkpoint
//! (`resolve`): bytes that changed at the same size (a flipped bit, a bad disk) are named there
//! rather than trained on. Checkpoints without CRCs (older sdkd) resume on sizes alone.
//! One writer per output folder (two runs writing into one folder would delete each other's
//! temporary folders).
use super::loss_scale::LossScale;
use crate::config::{identity_diff, RunConfig};
use crate::fs_safe;
use crate::models::weights;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const STUDENT_FILE: &str = "student.safetensors";
/// A `lora:` run's adapters (PEFT's parameter names), in place of the student.
pub const LORA_FILE: &str = "lora.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
/// `method: lcm`: the target network (diffusers' script saves it as `unet_target/`).
pub const TARGET_FILE: &str = "target.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const UNET_CONFIG_FILE: &str = "unet/config.json";

/// The JSON part of a checkpoint (`state.json`, besides the file list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateMeta {
    /// Optimizer steps done.
    pub step: u64,
    pub epoch: u64,
    /// Where the data loader stands; its own format (opaque here).
    pub data_cursor: serde_json::Value,
    pub seed: u64,
    /// `RunConfig::config_hash` of the run.
    pub config_hash: String,
    /// `RunConfig::resume_identity`, so a refused resume can name the keys that differ.
    #[serde(default)]
    pub config: serde_json::Value,
    pub sdkd_version: String,
    /// The dynamic loss scale of an fp16 run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScale>,
    /// Processes of the data-parallel run that wrote it (absent: one). Its `config` counts
    /// `train.grad_accum` over all of them, so a resume with another world size and the same
    /// global batch continues the same run.
    #[serde(default = "one_process", skip_serializing_if = "is_one_process")]
    pub world_size: usize,
    /// A `lora:` run: the frozen base its adapters were trained on (the checkpoint holds only
    /// the adapters, `lora.safetensors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_base: Option<BaseRef>,
}

/// The base UNet a LoRA checkpoint's adapters belong to: where its weights came from and a
/// checksum of them (`distributed::checksum` of its tensors in name order), which a resume or
/// an export checks the rebuilt base against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    /// `lora.base`, or the teacher (path or hub id@revision) the student was made from.
    pub source: String,
    /// 16 hex digits.
    pub checksum: String,
}

fn one_process() -> usize {
    1
}

fn is_one_process(n: &usize) -> bool {
    *n == 1
}

impl StateMeta {
    /// Meta for `step` of a run of `cfg` (seed, hash and identity from the config).
    pub fn new(cfg: &RunConfig, step: u64, epoch: u64, data_cursor: serde_json::Value) -> StateMeta {
        StateMeta {
            step,
            epoch,
            data_cursor,
            seed: cfg.train.seed,
            config_hash: cfg.config_hash(),
            config: cfg.resume_identity(),
            sdkd_version: env!("CARGO_PKG_VERSION").to_string(),
            loss_scale: None,
            world_size: 1,
            lora_base: None,
        }
    }
}

/// Everything a checkpoint holds. Tensors may live on any device; they are written as they are
/// (dtype kept).
pub struct TrainState {
    pub meta: StateMeta,
    /// The student's diffusers UNet config (`unet/config.json`).
    pub unet_config: serde_json::Value,
    pub student: Vec<(String, Tensor)>,
    pub ema: Option<Vec<(String, Tensor)>>,
    /// `method: lcm`: the target network's weights (the student's parameter names).
    pub target: Option<Vec<(String, Tensor)>>,
    pub optimizer: Vec<(String, Tensor)>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    #[serde(flatten)]
    meta: StateMeta,
    /// Relative path -> size in bytes of every other file of the checkpoint.
    files: BTreeMap<String, u64>,
    /// Relative path -> CRC-32 (IEEE) of the same files.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    crc32: BTreeMap<String, u32>,
}

/// The CRC-32 of the file at `path`, read in 8 MiB pieces.
fn crc32_of(path: &Path) -> Result<u32> {
    use std::io::Read;
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (mut hasher, mut buf) = (crc32fast::Hasher::new(), vec![0u8; 8 << 20]);
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

/// The keep-last-K policy: of the complete checkpoints' steps, those to delete (oldest first) so
/// that the newest `keep` remain. The newest is never deleted, even with `keep` = 0.
pub fn checkpoints_to_delete(complete_steps: &[u64], keep: usize) -> Vec<u64> {
    let mut steps = complete_steps.to_vec();
    steps.sort_unstable();
    steps.dedup();
    let keep = keep.max(1);
    let n = steps.len().saturating_sub(keep);
    steps.truncate(n);
    steps
}

/// Writes checkpoints into `<output_dir>/checkpoints/` and applies the keep-last-K policy.
pub struct CheckpointWriter {
    dir: PathBuf,
    keep: usize,
}

impl CheckpointWriter {
    pub fn new(output_dir: &Path, keep: usize) -> CheckpointWriter {
        CheckpointWriter { dir: checkpoints_dir(output_dir), keep }
    }

    /// `<output_dir>/checkpoints`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `step-<N>` atomically, then deletes the checkpoints the keep policy drops.
    /// Returns the new checkpoint's folder.
    pub fn write(&self, state: &TrainState) -> Result<PathBuf> {
        self.write_observed(state, &mut |_| Ok(()))
    }

    /// `write`, calling `after_file` with each file's path once it is written and fsynced; an
    /// error from it aborts the write as an I/O error would (tests inject failures this way).
    pub fn write_observed(
        &self,
        state: &TrainState,
        after_file: &mut dyn FnMut(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        fs_safe::clean_stale(&self.dir)?;
        let step = state.meta.step;
        let dest = self.dir.join(format!("step-{step}"));
        // Rewriting a step (resumed from an earlier checkpoint into the same folder) replaces it
        // only once the new one is complete.
        fs_safe::write_dir(&dest, None, |tmp| write_files(tmp, state, after_file))
            .with_context(|| format!("writing checkpoint step {step} at {}", dest.display()))?;
        self.prune(&state.meta)?;
        Ok(dest)
    }

    /// Deletes the checkpoints that the keep policy drops, counting only those of the run of
    /// `current` (same config hash) up to its step: another run's checkpoints, and those a
    /// resumed-from-earlier run has not reached again, are never deleted (nor can they make the
    /// policy delete the checkpoint just written). Renamed aside first, so a crash mid-delete
    /// never leaves a half-deleted `step-N`.
    pub fn prune(&self, current: &StateMeta) -> Result<Vec<u64>> {
        let steps: Vec<u64> = complete_in(&self.dir)?
            .into_iter()
            .filter(|c| c.meta.config_hash == current.config_hash && c.meta.step <= current.step)
            .map(|c| c.meta.step)
            .collect();
        let doomed = checkpoints_to_delete(&steps, self.keep);
        for step in &doomed {
            fs_safe::remove_dir(&self.dir.join(format!("step-{step}")))?;
        }
        Ok(doomed)
    }
}

fn write_files(tmp: &Path, state: &TrainState, after_file: &mut dyn FnMut(&Path) -> Result<()>) -> Result<()> {
    std::fs::create_dir_all(tmp.join("unet")).with_context(|| format!("creating {}", tmp.display()))?;
    let (mut files, mut crc32) = (BTreeMap::new(), BTreeMap::new());
    let mut record = |rel: &str, files: &mut BTreeMap<String, u64>| -> Result<()> {
        let path = tmp.join(rel);
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        file.sync_all().with_context(|| format!("fsync {}", path.display()))?;
        files.insert(rel.to_string(), file.metadata()?.len());
        crc32.insert(rel.to_string(), crc32_of(&path)?);
        after_file(&path)
    };
    let config = serde_json::to_string_pretty(&state.unet_config)?;
    write_text(&tmp.join(UNET_CONFIG_FILE), &config)?;
    record(UNET_CONFIG_FILE, &mut files)?;
    let trained = if state.meta.lora_base.is_some() { LORA_FILE } else { STUDENT_FILE };
    weights::save(&tmp.join(trained), &state.student, None)?;
    record(trained, &mut files)?;
    if let Some(ema) = &state.ema {
        weights::save(&tmp.join(EMA_FILE), ema, None)?;
        record(EMA_FILE, &mut files)?;
    }
    if let Some(target) = &state.target {
        weights::save(&tmp.join(TARGET_FILE), target, None)?;
        record(TARGET_FILE, &mut files)?;
    }
    weights::save(&tmp.join(OPTIMIZER_FILE), &state.optimizer, None)?;
    record(OPTIMIZER_FILE, &mut files)?;
    fs_safe::sync_dir(&tmp.join("unet"))?;
    // state.json last: its presence with matching sizes is what makes the folder complete.
    let json = serde_json::to_string_pretty(&StateFile { meta: state.meta.clone(), files, crc32 })?;
    write_text(&tmp.join(STATE_FILE), &json)?;
    File::open(tmp.join(STATE_FILE))?.sync_all()?;
    after_file(&tmp.join(STATE_FILE))?;
    fs_safe::sync_dir(tmp)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn checkpoints_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("checkpoints")
}

/// An opened complete checkpoint: its meta and student config read, every file checked.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub meta: StateMeta,
    pub unet_config: serde_json::Value,
    files: BTreeMap<String, u64>,
    crc32: BTreeMap<String, u32>,
}

impl Checkpoint {
    /// Opens a checkpoint folder, checking that `state.json` parses and that every file it
    /// lists (student, optimizer, unet config, EMA when there is one) is present with its size.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let state_path = dir.join(STATE_FILE);
        if !dir.is_dir() {
            bail!("checkpoint {} does not exist or is not a folder", dir.display());
        }
        let text = std::fs::read_to_string(&state_path)
            .with_context(|| format!("checkpoint {} is incomplete: cannot read {STATE_FILE}", dir.display()))?;
        let state: StateFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid checkpoint state", state_path.display()))?;
        let trained = if state.meta.lora_base.is_some() { LORA_FILE } else { STUDENT_FILE };
        for required in [trained, OPTIMIZER_FILE, UNET_CONFIG_FILE] {
            if !state.files.contains_key(required) {
                bail!("{} does not list {required}", state_path.display());
            }
        }
        for (rel, size) in &state.files {
            let path = dir.join(rel);
            let meta = std::fs::metadata(&path)
                .map_err(|e| anyhow!("checkpoint {} is incomplete: {rel} is missing ({e})", dir.display()))?;
            if meta.len() != *size {
                bail!(
                    "checkpoint {} is damaged: {rel} has {} bytes, {STATE_FILE} says {size}",
                    dir.display(),
                    meta.len()
                );
            }
        }
        let config_path = dir.join(UNET_CONFIG_FILE);
        let unet_config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?,
        )
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        Ok(Checkpoint { dir: dir.to_path_buf(), meta: state.meta, unet_config, files: state.files, crc32: state.crc32 })
    }

    /// Checks every file against the CRC-32 its `state.json` records (a read of the whole
    /// checkpoint: done on resume, not when listing).
    pub fn verify(&self) -> Result<()> {
        for (rel, want) in &self.crc32 {
            let got = crc32_of(&self.dir.join(rel))?;
            if got != *want {
                bail!(
                    "checkpoint {} is damaged: {rel} has CRC-32 {got:08x}, {STATE_FILE} says {want:08x} (its bytes changed after it was written)",
                    self.dir.display()
                );
            }
        }
        Ok(())
    }

    pub fn has_ema(&self) -> bool {
        self.files.contains_key(EMA_FILE)
    }

    /// The trained tensors: the student, or a `lora:` run's adapters.
    pub fn student_file(&self) -> PathBuf {
        self.dir.join(if self.is_lora() { LORA_FILE } else { STUDENT_FILE })
    }

    /// A `lora:` run's checkpoint (adapters only, `meta.lora_base` names the base).
    pub fn is_lora(&self) -> bool {
        self.meta.lora_base.is_some()
    }

    pub fn ema_file(&self) -> Option<PathBuf> {
        self.has_ema().then(|| self.dir.join(EMA_FILE))
    }

    /// `method: lcm`'s target network, when the checkpoint has one.
    pub fn target_file(&self) -> Option<PathBuf> {
        self.files.contains_key(TARGET_FILE).then(|| self.dir.join(TARGET_FILE))
    }

    pub fn optimizer_file(&self) -> PathBuf {
        self.dir.join(OPTIMIZER_FILE)
    }

    /// Copies the student weights into `vars` (strict names and shapes, memory-mapped).
    pub fn load_student_into(&self, vars: &HashMap<String, Tensor>) -> Result<()> {
        weights::load_strict(vars, &[self.student_file()])
    }

    /// Refuses a checkpoint of another run: the config hash must match, and the error names the
    /// keys that differ.
    pub fn check_config(&self, cfg: &RunConfig) -> Result<()> {
        let hash = cfg.config_hash();
        if self.meta.config_hash == hash {
            return Ok(());
        }
        let diff = identity_diff(&self.meta.config, &cfg.resume_identity());
        let shown: Vec<&str> = diff.iter().take(8).map(String::as_str).collect();
        bail!(
            "checkpoint {} belongs to a different run (config hash {} vs {hash}); differing keys (checkpoint vs config): {}",
            self.dir.display(),
            self.meta.config_hash,
            if shown.is_empty() { "unknown".to_string() } else { shown.join("; ") }
        )
    }

    /// Reads the whole checkpoint into memory (CPU tensors; for tests and small models: the
    /// trainer loads with `load_student_into` / `AdamW::load_state_file` instead).
    pub fn read_state(&self) -> Result<TrainState> {
        Ok(TrainState {
            meta: self.meta.clone(),
            unet_config: self.unet_config.clone(),
            student: weights::read_all(&self.student_file())?,
            ema: self.ema_file().map(|p| weights::read_all(&p)).transpose()?,
            target: self.target_file().map(|p| weights::read_all(&p)).transpose()?,
            optimizer: weights::read_all(&self.optimizer_file())?,
        })
    }
}

/// The complete checkpoints of an output folder, oldest first. Temporary, half-deleted and
/// incomplete folders are ignored.
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    Ok(complete_in(&checkpoints_dir(output_dir))?.into_iter().map(|c| (c.meta.step, c.dir)).collect())
}

/// Every `step-N` folder of a checkpoints folder, ascending by N, opened (or why it cannot be).
fn step_folders(dir: &Path) -> Result<Vec<(u64, PathBuf, Result<Checkpoint>)>> {
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) else { continue };
        let opened = Checkpoint::open(&entry.path()).and_then(|c| {
            if c.meta.step != step {
                bail!("its {STATE_FILE} says step {}", c.meta.step);
            }
            Ok(c)
        });
        out.push((step, entry.path(), opened));
    }
    out.sort_by_key(|(step, _, _)| *step);
    Ok(out)
}

fn complete_in(dir: &Path) -> Result<Vec<Checkpoint>> {
    Ok(step_folders(dir)?.into_iter().filter_map(|(_, _, c)| c.ok()).collect())
}

/// The newest complete checkpoint of an output folder, if any.
pub fn latest(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(output_dir)?.pop().map(|(_, p)| p))
}

/// `--resume latest` or `--resume <checkpoint dir>`: the checkpoint to resume from, opened.
/// `latest` says on stderr which newer checkpoints it skipped, and why.
pub fn resolve(output_dir: &Path, arg: &str) -> Result<Checkpoint> {
    if arg != "latest" {
        return Checkpoint::open(Path::new(arg)).and_then(|c| c.verify().map(|()| c)).with_context(|| format!("--resume {arg}"));
    }
    let mut folders = step_folders(&checkpoints_dir(output_dir))?;
    while let Some((_, dir, opened)) = folders.pop() {
        match opened.and_then(|c| c.verify().map(|()| c)) {
            Ok(c) => return Ok(c),
            Err(e) => eprintln!("warning: --resume latest: skipping {}: {e:#}", dir.display()),
        }
    }
    bail!("--resume latest: no complete checkpoint in {}", checkpoints_dir(output_dir).display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn keep_policy() {
        assert_eq!(checkpoints_to_delete(&[], 3), Vec::<u64>::new());
        assert_eq!(checkpoints_to_delete(&[500], 3), Vec::<u64>::new());
        assert_eq!(checkpoints_to_delete(&[500, 1000, 1500], 3), Vec::<u64>::new());
        assert_eq!(checkpoints_to_delete(&[2000, 500, 1500, 1000], 3), vec![500]);
        assert_eq!(checkpoints_to_delete(&[500, 1000, 1500, 2000, 2500], 2), vec![500, 1000, 1500]);
        // keep 0 still keeps the newest; duplicates are one checkpoint.
        assert_eq!(checkpoints_to_delete(&[10, 20, 30], 0), vec![10, 20]);
        assert_eq!(checkpoints_to_delete(&[10, 10, 20], 1), vec![10]);
        assert_eq!(checkpoints_to_delete(&[7], 1), Vec::<u64>::new());
    }

    fn state(step: u64, ema: bool) -> TrainState {
        let t = |v: f32| Tensor::full([2, 3], v as f64, (Kind::Float, Device::Cpu));
        TrainState {
            meta: StateMeta {
                step,
                epoch: step / 10,
                data_cursor: serde_json::json!({"index": step * 4}),
                seed: 42,
                config_hash: "abc".into(),
                config: serde_json::Value::Null,
                sdkd_version: "test".into(),
                loss_scale: None,
                world_size: 1,
                lora_base: None,
            },
            unet_config: serde_json::json!({"_class_name": "UNet2DConditionModel", "layers_per_block": 1}),
            student: vec![("conv_in.weight".into(), t(step as f32))],
            ema: ema.then(|| vec![("conv_in.weight".into(), t(0.5))]),
            target: None,
            optimizer: vec![
                ("exp_avg.conv_in.weight".into(), t(1.0)),
                ("step.conv_in.weight".into(), Tensor::from(step as i64)),
            ],
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn write_open_and_keep_last_k() {
        let out = tempfile::tempdir().unwrap();
        let w = CheckpointWriter::new(out.path(), 2);
        assert_eq!(latest(out.path()).unwrap(), None);
        for step in [10, 20, 30] {
            w.write(&state(step, true)).unwrap();
        }
        assert_eq!(names(w.dir()), vec!["step-20", "step-30"]);
        let c = Checkpoint::open(&latest(out.path()).unwrap().unwrap()).unwrap();
        assert_eq!((c.meta.step, c.meta.epoch, c.meta.data_cursor["index"].as_u64()), (30, 3, Some(120)));
        assert!(c.has_ema());
        assert_eq!(c.unet_config["layers_per_block"], 1);
        let s = c.read_state().unwrap();
        assert_eq!(s.student[0].1.double_value(&[0, 0]), 30.0);
        assert_eq!(s.ema.unwrap()[0].1.double_value(&[1, 2]), 0.5);
        assert_eq!(s.optimizer.iter().find(|(n, _)| n.starts_with("step.")).unwrap().1.int64_value(&[]), 30);
        let vars: HashMap<String, Tensor> =
            [("conv_in.weight".to_string(), Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)))].into();
        c.load_student_into(&vars).unwrap();
        assert_eq!(vars["conv_in.weight"].double_value(&[1, 1]), 30.0);

        assert_eq!(c.meta.loss_scale, None);
        let state_json = std::fs::read_to_string(c.dir.join(STATE_FILE)).unwrap();
        assert!(!state_json.contains("loss_scale"), "fp32/bf16 checkpoints carry no loss scale");

        // An fp16 run's loss scale comes back as it was.
        let mut fp16 = state(40, true);
        fp16.meta.loss_scale = Some(LossScale { scale: 8192.0, good_steps: 17 });
        let other = tempfile::tempdir().unwrap();
        let c = Checkpoint::open(&CheckpointWriter::new(other.path(), 1).write(&fp16).unwrap()).unwrap();
        assert_eq!(c.meta.loss_scale, Some(LossScale { scale: 8192.0, good_steps: 17 }));

        // Rewriting an existing step replaces it; no EMA means no ema.safetensors.
        w.write(&state(30, false)).unwrap();
        let c = Checkpoint::open(&w.dir().join("step-30")).unwrap();
        assert!(!c.has_ema() && !c.dir.join(EMA_FILE).exists());
        assert_eq!(names(w.dir()), vec!["step-20", "step-30"]);
        assert!(resolve(out.path(), "latest").is_ok());
        let e = format!("{:#}", resolve(out.path(), "/nonexistent/step-5").unwrap_err());
        assert!(e.contains("/nonexistent/step-5"), "{e}");
    }

    #[test]
    fn missing_or_truncated_files_are_named() {
        let out = tempfile::tempdir().unwrap();
        let w = CheckpointWriter::new(out.path(), 3);
        let dir = w.write(&state(5, true)).unwrap();
        for file in [STUDENT_FILE, EMA_FILE, OPTIMIZER_FILE, UNET_CONFIG_FILE, STATE_FILE] {
            let path = dir.join(file);
            let saved = std::fs::read(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            let e = format!("{:#}", Checkpoint::open(&dir).unwrap_err());
            assert!(e.contains(file) && e.contains("incomplete"), "{file}: {e}");
            assert_eq!(latest(out.path()).unwrap(), None, "{file} missing must not count as complete");
            std::fs::write(&path, &saved[..saved.len() / 2]).unwrap();
            if file != STATE_FILE {
                let e = format!("{:#}", Checkpoint::open(&dir).unwrap_err());
                assert!(e.contains(file) && e.contains("bytes"), "{file}: {e}");
            }
            std::fs::write(&path, &saved).unwrap();
            Checkpoint::open(&dir).unwrap();
        }
        let e = format!("{:#}", resolve(&out.path().join("elsewhere"), "latest").unwrap_err());
        assert!(e.contains("no complete checkpoint"), "{e}");
    }

    #[test]
    fn interrupted_writes_leave_the_previous_checkpoint() {
        let out = tempfile::tempdir().unwrap();
        let w = CheckpointWriter::new(out.path(), 1);
        let good = w.write(&state(100, true)).unwrap();

        // 1. A write that fails after its first file (disk full, I/O error): an error, nothing
        //    left behind, the previous checkpoint still the latest and loadable.
        let mut written = vec![];
        let e = w
            .write_observed(&state(200, true), &mut |p| {
                written.push(p.to_path_buf());
                bail!("injected failure after {}", p.display())
            })
            .unwrap_err();
        assert!(format!("{e:#}").contains("injected failure"), "{e:#}");
        assert_eq!(written.len(), 1);
        assert_eq!(latest(out.path()).unwrap().as_deref(), Some(good.as_path()));
        assert_eq!(names(w.dir()), vec!["step-100"]);

        // 2. A crash (kill -9) mid-write: a temp folder with a partial file, from a process that
        //    is gone, and an incomplete step folder (no state.json). Both are ignored.
        let crashed = w.dir().join(".step-300.tmp-4194999");
        std::fs::create_dir_all(crashed.join("unet")).unwrap();
        std::fs::write(crashed.join(STUDENT_FILE), b"partial").unwrap();
        let half = w.dir().join("step-400");
        std::fs::create_dir_all(&half).unwrap();
        std::fs::copy(good.join(STUDENT_FILE), half.join(STUDENT_FILE)).unwrap();
        assert_eq!(latest(out.path()).unwrap().as_deref(), Some(good.as_path()));
        let s = Checkpoint::open(&good).unwrap().read_state().unwrap();
        assert_eq!(s.student[0].1.double_value(&[0, 0]), 100.0);

        // 3. The next write cleans the stale temp folder, keeps 1 complete checkpoint, and leaves
        //    the foreign incomplete folder alone (it never deletes what it did not write).
        let newest = w.write(&state(500, false)).unwrap();
        assert_eq!(names(w.dir()), vec!["step-400", "step-500"]);
        assert_eq!(latest(out.path()).unwrap().as_deref(), Some(newest.as_path()));
    }

    #[test]
    fn config_mismatch_names_the_keys() {
        let base = "teacher: t\nstudent: bk_small\noutput_dir: o\ndata:\n  path: d\n";
        let a = RunConfig::from_yaml(base, Path::new("/r"), "a.yaml").unwrap();
        let b = RunConfig::from_yaml(&format!("{base}train:\n  seed: 7\n"), Path::new("/r"), "b.yaml").unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut st = state(10, false);
        st.meta = StateMeta::new(&a, 10, 0, serde_json::Value::Null);
        let dir = CheckpointWriter::new(out.path(), 3).write(&st).unwrap();
        let c = Checkpoint::open(&dir).unwrap();
        c.check_config(&a).unwrap();
        let e = format!("{:#}", c.check_config(&b).unwrap_err());
        assert!(e.contains("train.seed: 42 vs 7"), "{e}");
    }
}
