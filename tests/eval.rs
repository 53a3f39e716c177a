//! `sdkd eval` against the reference packages on a random-weight Inception-v3 in the published
//! layout (tests/reference/eval_reference.py): pytorch-fid's features for every --dims, its FID
//! between two folders (also from its .npz), torch-fidelity's extractor and Inception Score.
mod common;

use common::{assert_clean_failure, rel_err, run_reference, sdkd, tempdir};
use sdkd::eval::{self, fid, inception::InceptionV3, inception_score, Frontend};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::Device;

fn reference() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_keep, path) = DIR.get_or_init(|| {
        let dir = tempdir();
        run_reference("eval_reference.py", &[dir.path().to_str().unwrap()]);
        let path = dir.path().to_path_buf();
        (dir, path)
    });
    path
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(reference().join("expected.json")).unwrap()).unwrap()
}

/// The random-weight network, loaded once (tests take turns: LibTorch tensors are not Sync).
fn net() -> std::sync::MutexGuard<'static, InceptionV3> {
    static NET: OnceLock<std::sync::Mutex<InceptionV3>> = OnceLock::new();
    let m = NET.get_or_init(|| std::sync::Mutex::new(InceptionV3::load(&reference().join("inception.pth"), Device::Cpu).unwrap()));
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bound on max |sdkd - reference| / max |reference| of torch-fidelity's `logits_unbiased`
/// (measured 2.4e-5: its logits are a matmul LibTorch and torch-fidelity block differently); the
/// features themselves are asserted bit-identical.
const LOGITS_TOL: f64 = 1e-4;

#[test]
fn features_match_pytorch_fid_and_torch_fidelity() {
    let t = common::read_tensors(&reference().join("expected.safetensors"));
    let paths: Vec<PathBuf> = eval::list_images(&reference().join("a")).unwrap()[..3].to_vec();
    for dims in eval::inception::DIMS {
        let (f, _) = eval::features(&net(), &paths, Frontend::PytorchFid, dims, 3).unwrap();
        let e = rel_err(&f, &t[&format!("pytorch_fid/{dims}")]);
        println!("pytorch-fid dims {dims}: rel err {e:.2e}");
        assert!(f.equal(&t[&format!("pytorch_fid/{dims}")]), "dims {dims}: not bit-identical to pytorch-fid's ({e:e} relative)");
    }
    let (f, logits) = eval::features(&net(), &paths, Frontend::TorchFidelity, 2048, 2).unwrap();
    let (e_f, e_l) = (rel_err(&f, &t["fidelity/2048"]), rel_err(&logits.unwrap(), &t["fidelity/logits_unbiased"]));
    println!("torch-fidelity 2048: {e_f:.2e}, logits_unbiased: {e_l:.2e}");
    assert!(f.equal(&t["fidelity/2048"]), "torch-fidelity's features: not bit-identical ({e_f:e} relative)");
    assert!(e_l <= LOGITS_TOL, "logits_unbiased: {e_l:e}");
}

#[test]
fn fid_matches_pytorch_fid_from_folders_and_npz() {
    let want = expected();
    let out = sdkd(&["eval", "fid", reference().join("a").to_str().unwrap(), reference().join("b").to_str().unwrap(),
        "--dims", "64", "--inception", reference().join("inception.pth").to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let got: f64 = stdout.trim().strip_prefix("FID: ").unwrap_or_else(|| panic!("{stdout}")).parse().unwrap();
    let w = want["fid64"].as_f64().unwrap();
    println!("FID dims 64: sdkd {got}, pytorch-fid {w}");
    // measured 2.6e-12 apart (the float64 square root's round-off: docs/eval.md)
    assert!((got - w).abs() <= 1e-10 * w.abs(), "FID {got} vs pytorch-fid {w}");
    // 70 and 66 images < 2 x 64: said, and reported anyway
    assert!(stderr.contains("unreliable") && stderr.contains("70 images"), "{stderr}");

    // pytorch-fid's .npz as one side, and ours written and read back
    let dir = tempdir();
    let ours = dir.path().join("a.npz");
    let npz = reference().join("a_stats64.npz");
    let stats = fid::Stats::read_npz(&npz).unwrap();
    stats.write_npz(&ours).unwrap();
    let back = fid::Stats::read_npz(&ours).unwrap();
    assert!(back.mu.equal(&stats.mu) && back.sigma.equal(&stats.sigma));
    let b = eval::stats_of(&reference().join("b"), &net(), 64, 16).unwrap();
    let d = fid::frechet_distance(&back, &b).unwrap();
    let w = want["fid64_npz"].as_f64().unwrap();
    assert!((d - w).abs() <= 1e-10 * w.abs(), "FID from the .npz {d} vs pytorch-fid {w}");
    // --save-stats writes what pytorch-fid's save_fid_stats wrote for the same folder
    let saved = dir.path().join("a_saved.npz");
    let out = sdkd(&["eval", "fid", reference().join("a").to_str().unwrap(), saved.to_str().unwrap(), "--save-stats",
        "--dims", "64", "--inception", reference().join("inception.pth").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ours = fid::Stats::read_npz(&saved).unwrap();
    let (e_mu, e_sigma) = (rel_err(&ours.mu, &stats.mu), rel_err(&ours.sigma, &stats.sigma));
    println!("--save-stats vs pytorch-fid: mu {e_mu:.2e}, sigma {e_sigma:.2e}");
    assert!(ours.mu.equal(&stats.mu) && e_sigma <= 1e-15, "mu {e_mu:e} (must be 0), sigma {e_sigma:e}");
    // and never over an existing file
    assert_clean_failure(&sdkd(&["eval", "fid", reference().join("a").to_str().unwrap(), saved.to_str().unwrap(), "--save-stats",
        "--dims", "64", "--inception", reference().join("inception.pth").to_str().unwrap()]), "replaces nothing");
    // a stats-vs-itself distance is 0 (the square root's round-off stays far below 1e-3)
    assert!(fid::frechet_distance(&b, &b).unwrap().abs() < 1e-6);
}

#[test]
fn inception_score_matches_torch_fidelity() {
    let want = expected();
    for (n, perm) in want["perm"].as_object().unwrap() {
        let p: Vec<i64> = serde_json::from_value(perm.clone()).unwrap();
        assert_eq!(inception_score::numpy_permutation(n.parse().unwrap(), 2020), p, "permutation of {n}");
    }
    let t = common::read_tensors(&reference().join("expected.safetensors"));
    let (m, s) = inception_score::inception_score(&t["random_logits"], 10).unwrap();
    let w = &want["random_is"];
    assert!((m - w[0].as_f64().unwrap()).abs() <= 1e-9 && (s - w[1].as_f64().unwrap()).abs() <= 1e-9, "{m} {s} vs {w}");
}

/// `sdkd eval --images ... --metrics is --out`: report.json and report.md, the IS equal to
/// torch-fidelity's on the same 12 images; an existing report is never replaced without
/// --overwrite, and a folder sdkd did not make never.
#[test]
fn eval_report_has_torch_fidelitys_inception_score() {
    let want = expected();
    let dir = tempdir();
    let out = dir.path().join("eval");
    let weights = reference().join("inception.pth");
    let args = |out: &Path| -> Vec<String> {
        ["eval", "--images", reference().join("is").to_str().unwrap(), "--metrics", "is", "--inception",
            weights.to_str().unwrap(), "--batch-size", "4", "--out", out.to_str().unwrap()]
            .map(String::from)
            .to_vec()
    };
    let run = |a: &[String]| sdkd(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let o = run(&args(&out));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let (m, s) = (report["is_mean"].as_f64().unwrap(), report["is_std"].as_f64().unwrap());
    let (wm, ws) = (want["is_mean"].as_f64().unwrap(), want["is_std"].as_f64().unwrap());
    println!("IS: sdkd {m} ± {s}, torch-fidelity {wm} ± {ws}");
    assert!(wm > 1.05, "the random network's IS {wm} is too close to 1 to test anything");
    // equal but for the last bit of the std (measured: mean equal, std 3.6e-17 apart)
    assert!((m - wm).abs() <= 1e-12 && (s - ws).abs() <= 1e-12, "{m} ± {s} vs {wm} ± {ws}");
    assert_eq!(report["count"], 12);
    assert_eq!(report["settings"]["is_splits"], 10);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains(&format!("{m:.4} ± {s:.4}")), "{md}");

    // again: refused without --overwrite, the report untouched
    let before = std::fs::read(out.join("report.json")).unwrap();
    assert_clean_failure(&run(&args(&out)), "--overwrite");
    assert_eq!(std::fs::read(out.join("report.json")).unwrap(), before);
    // a user's folder is never written into
    let user = dir.path().join("mine");
    std::fs::create_dir(&user).unwrap();
    std::fs::write(user.join("notes.txt"), "mine").unwrap();
    assert_clean_failure(&run(&args(&user)), "sdkd did not make");
    assert_eq!(std::fs::read_to_string(user.join("notes.txt")).unwrap(), "mine");
    // FID needs the real images
    let mut a = args(&dir.path().join("fid"));
    a[4] = "fid,is".into();
    assert_clean_failure(&run(&a), "--real");
    a[4] = "fid,clip".into();
    assert_clean_failure(&run(&a), "clip");
}

#[test]
fn missing_or_wrong_weights_say_where_to_get_them() {
    let dir = tempdir();
    let a = reference().join("a");
    let missing = dir.path().join("pt_inception.pth");
    let out = sdkd(&["eval", "fid", a.to_str().unwrap(), a.to_str().unwrap(), "--inception", missing.to_str().unwrap()]);
    assert_clean_failure(&out, "pt_inception-2015-12-05-6726825d.pth");
    let junk = dir.path().join("junk.pth");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let out = sdkd(&["eval", "fid", a.to_str().unwrap(), a.to_str().unwrap(), "--inception", junk.to_str().unwrap()]);
    assert_clean_failure(&out, "junk.pth");
    assert_clean_failure(&out, "github.com/mseitzer/pytorch-fid");
    // a torch file with other tensors: the first missing layer is named
    let out = sdkd(&["eval", "fid", a.to_str().unwrap(), a.to_str().unwrap(), "--dims", "64", "--inception",
        reference().join("a_stats64.npz").to_str().unwrap()]);
    assert_clean_failure(&out, "a_stats64.npz");
    let out = sdkd(&["eval", "fid", a.to_str().unwrap(), a.to_str().unwrap()]);
    assert_clean_failure(&out, "--inception");
}
