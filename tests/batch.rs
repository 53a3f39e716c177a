//! Batched generation (`pipeline::generate_batch`, what `sdkd serve --max-batch` runs) on the
//! CPU: every request of a batch gets the images it gets alone, within one level on at most 1% of
//! the pixels (bit for bit on AVX2 CPUs; see `batch_close`), a margin that a wrong seed or row
//! order exceeds by far (checked here) (for every
//! scheduler, DDPM and Euler ancestral drawing step noise included; guidance on and off; two
//! samples), a member cancelled mid-way leaves the batch while the others go on, and a member
//! that fails its checks fails alone. Over the SD-1.x-like tiny pipeline of
//! tests/reference/make_pipeline.py (4 stages, mid block).
mod common;

use common::*;
use sdkd::pipeline::{generate_batch, BatchMember, Cancelled, GenerateRequest, TextToImage};
use sdkd::schedulers::SchedulerKind;
use std::cell::Cell;
use tch::{Device, Kind};

/// The tests of this binary run on parallel threads of one process, and LibTorch's CPU
/// generator (seeded and restored per request, as PyTorch's default generator) and its thread
/// pool are the process's: one test generates at a time, or the others' draws interleave.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The pipeline folder, made once per test binary.
fn pipeline() -> TextToImage {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempdir();
        run_reference("make_pipeline.py", &[&dir.path().join("sd1").display().to_string(), "--stages", "4"]);
        dir
    });
    TextToImage::load(&dir.path().join("sd1"), None, Device::Cpu, Kind::Float).unwrap()
}

/// Three requests that batch together: other prompts, seeds and guidance scales.
fn requests(scheduler: SchedulerKind, guidance: [f64; 3], samples: usize) -> Vec<GenerateRequest> {
    let prompts = ["a red cube on a blue floor", "a toy panda", "two green spheres at dusk"];
    (0..3)
        .map(|i| GenerateRequest {
            prompt: prompts[i].into(),
            negative_prompt: (i == 2).then(|| "blurry".into()),
            scheduler,
            steps: 6,
            guidance_scale: guidance[i],
            seed: 1000 + 17 * i as u64,
            width: Some(32),
            height: Some(32),
            samples,
            ..GenerateRequest::default()
        })
        .collect()
}

/// Each member's result from one `generate_batch` call, stopping member `i` before step `k` for
/// each `(i, k)` of `cancel`.
fn batched(t2i: &TextToImage, reqs: &[GenerateRequest], cancel: &[(usize, usize)]) -> Vec<anyhow::Result<Vec<image::RgbImage>>> {
    let asked: Vec<Cell<usize>> = reqs.iter().map(|_| Cell::new(0)).collect();
    let stops: Vec<Box<dyn Fn() -> Option<String>>> = (0..reqs.len())
        .map(|i| {
            let (asked, at) = (&asked[i], cancel.iter().find(|c| c.0 == i).map(|c| c.1));
            Box::new(move || {
                let n = asked.get();
                asked.set(n + 1);
                (Some(n) == at).then(|| "test cancel".to_string())
            }) as Box<dyn Fn() -> Option<String>>
        })
        .collect();
    let members: Vec<BatchMember> = reqs.iter().zip(&stops).map(|(req, stop)| BatchMember { req, stop: stop.as_ref(), noise: None }).collect();
    let mut results: Vec<Option<anyhow::Result<Vec<image::RgbImage>>>> = reqs.iter().map(|_| None).collect();
    generate_batch(&t2i.parts(), &members, &mut |_, _| {}, &mut |i, r| {
        assert!(results[i].is_none(), "member {i} settled twice");
        results[i] = Some(r);
    });
    results.into_iter().enumerate().map(|(i, r)| r.unwrap_or_else(|| panic!("member {i} never settled"))).collect()
}

/// Whether `b` is `a` up to what a batch may change: the last bit of a GEMM whose blocking
/// depends on the row count, which on CPUs with AVX-512/AMX kernels moves a few pixels by one
/// level (measured: 4 of 1,024) and on AVX2 machines none. A wrong seed, generator state or row
/// order changes nearly every pixel (`the_batch_tolerance_catches_a_wrong_seed_or_row_order`).
/// Returns (within, pixels differing, largest difference).
fn batch_close(a: &image::RgbImage, b: &image::RgbImage) -> (bool, usize, u8) {
    let differing = a.pixels().zip(b.pixels()).filter(|(p, q)| p != q).count();
    let most = a.as_raw().iter().zip(b.as_raw()).map(|(&p, &q)| p.abs_diff(q)).max().unwrap_or(0);
    (a.dimensions() == b.dimensions() && most <= 1 && differing * 100 <= a.pixels().len(), differing, most)
}

fn assert_alone_equal(t2i: &TextToImage, req: &GenerateRequest, got: &[image::RgbImage], what: &str) {
    let alone = t2i.generate(req).unwrap();
    assert_eq!(alone.len(), got.len(), "{what}");
    for (k, (a, b)) in alone.iter().zip(got).enumerate() {
        let (within, differing, most) = batch_close(a, b);
        eprintln!("{what}, image {k}: {differing} of {} pixels differ, by at most {most}", a.pixels().len());
        assert!(within, "{what}, image {k}: {differing} pixels differ from the unbatched image, by up to {most} levels");
    }
    let (lo, hi) = got[0].pixels().flat_map(|p| p.0).fold((255u8, 0u8), |(lo, hi), v| (lo.min(v), hi.max(v)));
    assert!(hi - lo > 30, "{what}: a flat image ({lo}..{hi}) would hide differences");
}

#[test]
fn batched_requests_get_their_unbatched_pixels() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t2i = pipeline();
    let mut cases = vec![];
    for kind in SchedulerKind::ALL {
        cases.push((format!("{kind}, guidance"), requests(kind, [7.5, 3.0, 5.0], 1)));
    }
    cases.push(("euler_a, guidance off, 2 samples".into(), requests(SchedulerKind::EulerAncestral, [1.0, 0.5, 1.0], 2)));
    cases.push(("ddpm, guidance, 2 samples".into(), requests(SchedulerKind::Ddpm, [7.5, 2.0, 4.0], 2)));
    for (what, reqs) in cases {
        assert!(t2i.parts().batches_exactly(&reqs[0]), "{what}");
        for (i, (req, got)) in reqs.iter().zip(batched(&t2i, &reqs, &[])).enumerate() {
            assert_alone_equal(&t2i, req, &got.unwrap(), &format!("{what}, request {i}"));
        }
    }
}

#[test]
fn a_cancelled_member_leaves_the_batch_and_a_bad_one_fails_alone() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t2i = pipeline();
    let mut reqs = requests(SchedulerKind::EulerAncestral, [7.5, 3.0, 5.0], 1);
    reqs.push(GenerateRequest { width: Some(36), ..reqs[0].clone() }); // not a multiple of 8
    let results = batched(&t2i, &reqs, &[(1, 3)]);
    let cancelled = results[1].as_ref().unwrap_err().downcast_ref::<Cancelled>().expect("a Cancelled error").clone();
    assert_eq!(cancelled, Cancelled { cause: "test cancel".into(), done: 3, total: 6 });
    let e = results[3].as_ref().unwrap_err().to_string();
    assert!(e.contains("width = 36"), "{e}");
    for i in [0, 2] {
        assert_alone_equal(&t2i, &reqs[i], results[i].as_ref().unwrap(), &format!("request {i}, after request 1 left"));
    }
    // a request that does not batch with the first is refused, the others run
    let mut mixed = requests(SchedulerKind::Unipc, [7.5, 3.0, 5.0], 1);
    mixed[2].steps = 9;
    let results = batched(&t2i, &mixed, &[]);
    assert!(results[2].as_ref().unwrap_err().to_string().contains("does not batch"));
    assert_alone_equal(&t2i, &mixed[1], results[1].as_ref().unwrap(), "unipc request 1 beside a refused one");
}

#[test]
fn requests_with_too_few_rows_are_not_batched() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t2i = pipeline();
    let req = requests(SchedulerKind::Ddim, [7.5; 3], 1)[0].clone();
    assert!(t2i.parts().batches_exactly(&req));
    // guidance off, one sample: one UNet row, whose convolutions run another algorithm alone
    assert!(!t2i.parts().batches_exactly(&GenerateRequest { guidance_scale: 1.0, ..req.clone() }));
    assert!(t2i.parts().batches_exactly(&GenerateRequest { guidance_scale: 1.0, samples: 2, ..req.clone() }));
    // 16x16 pixels: 8x8 latents, 1x1 in the fourth stage, 2 rows per request with guidance
    let tiny = GenerateRequest { width: Some(16), height: Some(16), ..req };
    assert!(!t2i.parts().batches_exactly(&tiny));
    // 2 samples with guidance: 4 rows, a multiple of 4
    assert!(t2i.parts().batches_exactly(&GenerateRequest { samples: 2, ..tiny }));
}

/// The negative control of `batch_close`: the image of the right request under another seed, and
/// the image of the neighbouring request (rows swapped), are both far outside it.
#[test]
fn the_batch_tolerance_catches_a_wrong_seed_or_row_order() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t2i = pipeline();
    let reqs = requests(SchedulerKind::Ddim, [7.5, 3.0, 5.0], 1);
    let got: Vec<image::RgbImage> = batched(&t2i, &reqs, &[]).into_iter().map(|r| r.unwrap().remove(0)).collect();
    let alone = t2i.generate(&reqs[0]).unwrap().remove(0);
    assert!(batch_close(&alone, &got[0]).0, "the right request, batched");
    let reseeded = t2i.generate(&GenerateRequest { seed: reqs[0].seed + 1, ..reqs[0].clone() }).unwrap().remove(0);
    for (what, other) in [("another seed", &reseeded), ("the neighbouring row", &got[1])] {
        let (within, differing, most) = batch_close(&alone, other);
        eprintln!("{what}: {differing} of {} pixels differ, by up to {most}", alone.pixels().len());
        assert!(!within && differing * 2 > alone.pixels().len(), "{what}: only {differing} pixels differ, by up to {most}");
    }
}
