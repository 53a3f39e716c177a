//! `sdkd demo --quick`: the whole job runs end to end and leaves what a person looks at: a report
//! with every model's held-out loss, a grid, pipelines diffusers loads, and rerunnable run files.
//! The quick teacher (150 steps) already reads the background colour from its captions, and even
//! at the quick run's 6 student steps the KD student keeps that and beats the control trained from
//! scratch on held-out loss. Measured: teacher background 100%, KD student 88% (14 of 16), control
//! 31%; held-out loss KD 0.3526 against the control's 0.6751, 47.8% lower.
//! Then `--quick --lcm` on the finished demo runs only the LCM stage and adds its section.
mod common;

use common::*;

#[test]
fn quick_demo_runs_the_whole_job() {
    let tmp = tempdir();
    let out = tmp.path().join("demo");
    let o = sdkd(&["demo", "--quick", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "demo failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for row in ["| teacher |", "| bk_small pruned |", "| bk_small KD |", "| bk_small scratch |"] {
        assert!(report.contains(row), "report lacks {row}:\n{report}");
    }
    let losses: Vec<f64> = report
        .lines()
        .filter(|l| (l.starts_with("| teacher") || l.starts_with("| bk_small")) && l.matches('|').count() == 8)
        .map(|l| l.trim_end_matches('|').rsplit('|').next().unwrap().trim().parse().unwrap())
        .collect();
    assert!(losses.len() == 4 && losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
    // The README's sizes, counted by diffusers: each exported pipeline loaded by
    // StableDiffusionPipeline (check_pipeline.py), its UNet's parameters summed there; the report
    // must give diffusers' counts, and they must be the README's 3.3M teacher and 58.5% student.
    let diffusers_params = |dir: &str| -> i64 {
        let o = python_command()
            .arg(root().join("tests/reference/check_pipeline.py"))
            .arg(out.join(dir))
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "check_pipeline.py {dir}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{dir}: {e}"));
        v["unet_params"].as_i64().unwrap()
    };
    let (teacher_n, kd_n, scratch_n) = (diffusers_params("teacher"), diffusers_params("student_kd"), diffusers_params("student_scratch"));
    let row_params = |row: &str| -> i64 {
        let line = report.lines().find(|l| l.starts_with(&format!("| {row} |")) && l.matches('|').count() == 8).unwrap_or_else(|| panic!("no row {row}:\n{report}"));
        line.split('|').nth(3).unwrap().trim().replace(',', "").parse().unwrap()
    };
    assert_eq!((row_params("teacher"), row_params("bk_small KD"), row_params("bk_small scratch")), (teacher_n, kd_n, scratch_n), "report vs diffusers:\n{report}");
    assert_eq!((teacher_n, kd_n), (3_277_988, 1_918_660), "the README's counts vs diffusers'");
    assert_eq!(format!("{:.1}%", 100.0 * kd_n as f64 / teacher_n as f64), "58.5%");
    let (pruned, kd, scratch) = (losses[1], losses[2], losses[3]);
    eprintln!("held-out loss: pruned {pruned:.4}, KD {kd:.4}, scratch {scratch:.4}: KD {:.1}% lower", 100.0 * (1.0 - kd / scratch));
    // half the measured margin: KD at least 24% below scratch, and training improved on the copy
    assert!(kd < 0.76 * scratch, "KD student {kd} is not 24% below the scratch control {scratch}:\n{report}");
    assert!(kd < pruned, "6 KD steps did not improve on the pruned copy ({kd} vs {pruned})");
    // 4 rows (held-out image, teacher, KD student, control) of 4 prompts, 32 px enlarged 4x
    let grid = image::open(out.join("grid.png")).unwrap();
    assert!(grid.height() >= 4 * 128 && grid.width() >= 4 * 128, "{}x{}", grid.width(), grid.height());
    // caption following: the reader reads the held-out images themselves, and scores every model
    let accuracy = |row: &str| -> Vec<f64> {
        let line = report.lines().find(|l| l.starts_with(&format!("| {row} |")) && l.matches('|').count() == 5).unwrap_or_else(|| panic!("no accuracy row {row}:\n{report}"));
        line.split('|').skip(2).filter_map(|c| c.trim().strip_suffix('%')).map(|c| c.parse::<f64>().unwrap() / 100.0).collect()
    };
    assert_eq!(accuracy("held-out images (the reader's check)"), vec![1.0; 3], "{report}");
    for row in ["teacher", "bk_small KD", "bk_small scratch"] {
        let a = accuracy(row);
        assert!(a.len() == 3 && a.iter().all(|x| (0.0..=1.0).contains(x)), "{row}: {a:?}");
    }
    // The background read from the caption: at least 12 of the 16 held-out captions. Chance is
    // 31% (the set's most common background, 5 of 16, is what a model ignoring its captions
    // scores at best), and a model right 31% of the time reaches 12 of 16 with probability ~4e-4.
    for row in ["teacher", "bk_small KD"] {
        let background = accuracy(row)[0];
        assert!(background >= 0.75, "{row}: background accuracy {background} is not above chance (0.31) by the bar (0.75):\n{report}");
    }
    assert!(report.contains("mean cosine similarity"), "{report}");
    for model in ["teacher", "student_kd", "student_scratch"] {
        assert_eq!(std::fs::read_dir(out.join("samples").join(model)).unwrap().count(), 16, "every held-out caption drawn");
    }
    // without --inception the report says where the weights come from
    assert!(report.contains("Not computed: pass `--inception <file>`") && report.contains("pt_inception-2015-12-05-6726825d.pth"), "{report}");
    for cfg in ["teacher", "student_kd", "student_scratch"] {
        let path = out.join("configs").join(format!("{cfg}.yaml"));
        sdkd::config::RunConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    }
    assert!(out.join("runs/student_kd/tb").is_dir());
    // the accuracies also go to each run's TensorBoard log, at its last step
    let tb = python_command().arg(root().join("tests/reference/trainkit_tb_read.py")).arg(out.join("runs/teacher/tb")).output().unwrap();
    assert!(tb.status.success(), "{}", String::from_utf8_lossy(&tb.stderr));
    let tb: serde_json::Value = serde_json::from_slice(&tb.stdout).unwrap();
    for a in ["background", "object_colour", "position"] {
        let points = tb["scalars"][format!("eval/caption_accuracy/{a}")].as_array().unwrap_or_else(|| panic!("no eval/caption_accuracy/{a}: {tb}")).clone();
        assert_eq!(points.len(), 1, "{a}: {points:?}");
        assert_eq!(points[0][0].as_i64(), Some(150), "at the teacher's last step");
    }

    // The LCM stage on this finished demo (`--lcm` on it runs only the stage): the KD student
    // distilled to LCM, every held-out caption drawn by the teacher and the KD student (10 UniPC
    // steps) and the LCM student at 1, 2, 4 and 8 LCM steps, each row with its accuracies, pixel
    // RMSE and images per second, in a section added to the same report.
    let o = sdkd(&["demo", "--quick", "--lcm", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "demo --lcm failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let after = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(after.starts_with(report.trim_end()), "the demo's report is kept:\n{after}");
    let rows: Vec<Vec<String>> = after
        .lines()
        .filter(|l| l.matches('|').count() == 9 && !l.starts_with("|---") && !l.starts_with("| model"))
        .map(|l| l.split('|').skip(1).take(8).map(|c| c.trim().to_string()).collect())
        .collect();
    let keys: Vec<(&str, &str, &str)> = rows.iter().map(|r| (r[0].as_str(), r[1].as_str(), r[2].as_str())).collect();
    assert_eq!(
        keys,
        [("teacher", "unipc", "10"), ("bk_small KD", "unipc", "10"), ("bk_small LCM", "lcm", "1"), ("bk_small LCM", "lcm", "2"), ("bk_small LCM", "lcm", "4"), ("bk_small LCM", "lcm", "8")],
        "{after}"
    );
    for r in &rows {
        let acc: Vec<f64> = r[3..6].iter().map(|c| c.strip_suffix('%').unwrap().parse::<f64>().unwrap() / 100.0).collect();
        let (rmse, speed): (f64, f64) = (r[6].parse().unwrap(), r[7].parse().unwrap());
        assert!(acc.iter().all(|a| (0.0..=1.0).contains(a)) && rmse > 0.0 && rmse < 255.0 && speed > 0.0, "{r:?}");
    }
    // the stage re-draws the teacher and the KD student: the same images, so the same accuracies
    // as the demo's own section
    assert_eq!(rows[0][3..6], accuracy("teacher").iter().map(|a| format!("{:.0}%", 100.0 * a)).collect::<Vec<_>>()[..], "{after}");
    assert!(after.contains("At 4 steps the LCM student keeps") && after.contains("x the teacher**"), "{after}");
    // 7 rows (held-out image, teacher, KD student, LCM at 1, 2, 4, 8) of 4 prompts at 128 px
    let grid = image::open(out.join("grid_lcm.png")).unwrap();
    assert!(grid.height() >= 7 * 128 && grid.width() >= 4 * 128, "{}x{}", grid.width(), grid.height());
    for n in [1, 2, 4, 8] {
        assert_eq!(std::fs::read_dir(out.join(format!("samples/student_lcm-{n}steps"))).unwrap().count(), 16);
    }
    let unet: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("student_lcm/unet/config.json")).unwrap()).unwrap();
    assert_eq!(unet["time_cond_proj_dim"].as_i64(), Some(256));
    let index = std::fs::read_to_string(out.join("student_lcm/model_index.json")).unwrap();
    assert!(index.contains("LCMScheduler"), "{index}");
    // the stage's 25-point DDIM grid is the exported scheduler's
    let scheduler: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("student_lcm/scheduler/scheduler_config.json")).unwrap()).unwrap();
    assert_eq!(scheduler["original_inference_steps"].as_i64(), Some(25), "{scheduler}");
    // a file of the user's where a rerun of the stage would write: refused before any work, kept
    let mine = out.join("student_lcm/notes.txt");
    std::fs::write(&mine, "mine").unwrap();
    let o = sdkd(&["demo", "--quick", "--lcm", "--out", out.to_str().unwrap()]);
    assert_clean_failure(&o, "student_lcm/notes.txt");
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "mine");
    assert!(out.join("grid_lcm.png").exists(), "a refused stage removed the earlier one's grid");
}

/// `sdkd demo --family sdxl --quick`: the same job on an SDXL pipeline (two text encoders, the
/// pooled embedding and the time ids through the caches, the held-out loss and the sampling),
/// a tiny SDXL-shaped teacher trained from scratch and a `vega`-shaped student pruned from it:
/// KD ahead of the control (the same student from scratch, task loss only) by the held-out loss.
/// An unknown `--family`, and the LCM stage (SD's only) with SDXL, are refused first.
#[test]
fn quick_sdxl_demo_distils_vega_ahead_of_the_control() {
    let tmp = tempdir();
    let out = tmp.path().join("demo");
    let o = sdkd(&["demo", "--quick", "--family", "sd3", "--out", out.to_str().unwrap()]);
    assert_clean_failure(&o, "--family \"sd3\"");
    let o = sdkd(&["demo", "--quick", "--family", "sdxl", "--lcm", "--out", out.to_str().unwrap()]);
    assert_clean_failure(&o, "--lcm with --family sdxl");
    assert!(!out.exists(), "a refused demo wrote its output");

    let started = std::time::Instant::now();
    let o = sdkd(&["demo", "--quick", "--family", "sdxl", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "demo failed:\n{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("sdxl quick demo: {:.1} s", started.elapsed().as_secs_f64());
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let cells = |row: &str| -> Vec<String> {
        let line = report.lines().find(|l| l.starts_with(&format!("| {row} |")) && l.matches('|').count() == 8).unwrap_or_else(|| panic!("no row {row}:\n{report}"));
        line.split('|').map(|c| c.trim().to_string()).collect()
    };
    let loss = |row: &str| -> f64 { cells(row)[7].parse().unwrap() };
    let params = |row: &str| -> i64 { cells(row)[3].replace(',', "").parse().unwrap() };
    let (teacher, pruned, kd, scratch) = (loss("teacher"), loss("vega pruned"), loss("vega KD"), loss("vega scratch"));
    assert!([teacher, pruned, kd, scratch].iter().all(|l| l.is_finite() && *l > 0.0), "{report}");
    eprintln!("held-out loss: teacher {teacher:.4}, pruned {pruned:.4}, KD {kd:.4}, scratch {scratch:.4}: KD {:.1}% lower", 100.0 * (1.0 - kd / scratch));
    // measured 24.2% (seed 0, the test's) and 26.5% (seed 1) lower; the bar is half of that
    assert!(kd < 0.88 * scratch, "the KD student {kd} is not 12% ahead of the control {scratch}:\n{report}");
    assert!(report.contains("KD is") && report.contains("% better"), "{report}");

    // an SDXL pipeline with a vega-shaped student, as the report says: the sizes it gives are the
    // exported UNets' own, and the student is the preset's structure on this teacher
    let model_index = std::fs::read_to_string(out.join("teacher/model_index.json")).unwrap();
    assert!(model_index.contains("StableDiffusionXLPipeline"), "{model_index}");
    let unet = |dir: &str| sdkd::models::UNet::load(&out.join(dir).join("unet"), tch::Device::Cpu, tch::Kind::Float).unwrap();
    let (t, k, s) = (unet("teacher"), unet("student_kd"), unet("student_scratch"));
    assert!(sdkd::distill::student::is_sdxl(&t.model.config), "the teacher has SDXL's layout");
    let vega = sdkd::distill::student::StudentPlan::resolve("vega", Some(&t.model.config)).unwrap();
    assert_eq!((&k.model.config, &s.model.config), (&vega.config, &vega.config), "both students are vega on this teacher");
    assert!(vega.config.transformer_block_count() < t.model.config.transformer_block_count());
    assert_eq!((params("teacher"), params("vega KD"), params("vega scratch")), (t.num_params(), k.num_params(), s.num_params()), "{report}");
    let grid = image::open(out.join("grid.png")).unwrap();
    assert!(grid.height() >= 4 * 128 && grid.width() >= 4 * 128, "{}x{}", grid.width(), grid.height());
    for model in ["teacher", "student_kd", "student_scratch"] {
        assert_eq!(std::fs::read_dir(out.join("samples").join(model)).unwrap().count(), 16, "every held-out caption drawn");
    }
}
