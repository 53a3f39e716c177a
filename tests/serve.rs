//! `sdkd serve` over a tiny diffusers pipeline (tests/reference/make_pipeline.py), spoken to with
//! plain HTTP/1.1: every status code of docs/serve.md, `x-remaining-credits` on every answer,
//! credits spent only on images made, and the served image equal to `sdkd generate`'s for the
//! same request (which tests/generate.rs holds to diffusers').
mod common;

use common::serve_http::*;
use common::*;
use serde_json::{json, Value};

const PANDA: &str = "a toy panda standing on a pile of broccoli";

#[test]
fn api_status_codes_credits_and_images() {
    let dir = tempdir();
    let (model, db) = (dir.path().join("pipe"), dir.path().join("keys.sqlite"));
    run_reference("make_pipeline.py", &[&model.display().to_string()]);
    let alice = add_key(&db, "alice", 3);
    let mut server = Server::start(&model, &db, &dir.path().join("serve.log"), &[]);
    let addr = server.addr.clone();
    let post = |key: Option<&str>, body: &Value| http(&addr, "POST", "/v1/txt2img", key, Some(body));

    // 200, the PNG itself: the image `sdkd generate` makes of the same request
    let request = json!({
        "prompt": PANDA, "negative_prompt": "blurry, low quality", "scheduler": "dpmpp_2m",
        "num_inference_steps": 20, "guidance_scale": 7.5, "samples": 1, "seed": 2313248373u64,
        "img_width": 64, "img_height": 128, "base64": false
    });
    let a = post(Some(&alice), &request);
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!((a.headers["content-type"].as_str(), a.credits(), a.headers["x-seed"].as_str()), ("image/png", 2, "2313248373"));
    let served = image::load_from_memory(&a.body).unwrap().to_rgb8();
    let local = dir.path().join("local.png");
    let m = model.display().to_string();
    let out = sdkd(&[
        "generate", "--model", &m, "--prompt", PANDA, "--negative-prompt", "blurry, low quality", "--scheduler", "dpmpp_2m",
        "--steps", "20", "--seed", "2313248373", "--width", "64", "--height", "128", "--device", "cpu", "--out", &local.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let local = image::open(&local).unwrap().to_rgb8();
    assert_eq!(served.dimensions(), (64, 128));
    assert!(served == local, "the served image differs from sdkd generate's");
    let (lo, hi) = served.pixels().flat_map(|p| p.0).fold((255u8, 0u8), |(lo, hi), v| (lo.min(v), hi.max(v)));
    assert!(hi - lo > 50, "a flat image ({lo}..{hi}) would hide errors");

    // 200, JSON with base64 PNGs: two samples from a random seed cost two credits
    let a = post(Some(&alice), &json!({"prompt": PANDA, "samples": 2, "img_width": 64, "img_height": 64}));
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let j = a.json();
    let images = j["images"].as_array().unwrap();
    assert_eq!((images.len(), a.credits(), j["scheduler"].as_str(), j["num_inference_steps"].as_i64()), (2, 0, Some("unipc"), Some(20)));
    let seed = j["seed"].as_u64().expect("a numeric seed");
    assert_eq!(a.headers["x-seed"], seed.to_string());
    use base64::Engine;
    let decoded: Vec<_> = images
        .iter()
        .map(|b| image::load_from_memory(&base64::engine::general_purpose::STANDARD.decode(b.as_str().unwrap()).unwrap()).unwrap().to_rgb8())
        .collect();
    assert!(decoded.iter().all(|im| im.dimensions() == (64, 64)) && decoded[0] != decoded[1]);

    // 406: no credits left; nothing generated, nothing taken
    let a = post(Some(&alice), &json!({"prompt": PANDA, "img_width": 64, "img_height": 64}));
    assert_eq!((a.status, a.credits()), (406, 0));
    assert!(a.error().contains("credits"), "{}", a.error());

    // 400: a bad body names the field and costs nothing
    let bob = add_key(&db, "bob", 5);
    for (body, field) in [
        (json!({"prompt": PANDA, "num_inference_steps": 10}), "num_inference_steps"),
        (json!({"prompt": PANDA, "img_width": 100}), "img_width"),
        (json!({"prompt": PANDA, "scheduler": "heun"}), "scheduler"),
        // LCM takes 1 to original_inference_steps (50 in this config) steps
        (json!({"prompt": PANDA, "scheduler": "lcm", "num_inference_steps": 60}), "original_inference_steps"),
        (json!({"prompt": PANDA, "sampels": 2}), "sampels"),
        (json!({"prompt": PANDA, "samples": "two"}), "samples"),
    ] {
        let a = post(Some(&bob), &body);
        assert_eq!((a.status, a.credits()), (400, 5), "{body}: {}", a.error());
        assert!(a.error().contains(field), "{body}: {}", a.error());
    }

    // 401: no key, an unknown key
    for key in [None, Some("sdkd_0000")] {
        let a = post(key, &request);
        assert_eq!((a.status, a.credits()), (401, 0), "{key:?}");
        assert!(a.error().contains("authentication failed"), "{}", a.error());
    }

    // Two requests at once, 2 images each, against 3 credits: exactly one is served. (The server
    // may also have run them one after the other; `last_credit_race_has_one_winner` races the
    // spending itself.)
    let carol = add_key(&db, "carol", 3);
    let body = json!({"prompt": PANDA, "samples": 2, "img_width": 64, "img_height": 64, "seed": 1});
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..2).map(|_| s.spawn(|| http(&addr, "POST", "/v1/txt2img", Some(&carol), Some(&body)).status)).collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let mut sorted = statuses.clone();
    sorted.sort();
    assert_eq!(sorted, vec![200, 406], "{statuses:?}");

    // 404, 405: still answered with the key's credits
    let a = http(&addr, "GET", "/v1/nothing-here", Some(&bob), None);
    assert_eq!((a.status, a.credits()), (404, 5));
    let a = http(&addr, "GET", "/v1/txt2img", Some(&bob), None);
    assert_eq!((a.status, a.credits()), (405, 5));
    assert_eq!(http(&addr, "GET", "/v1/health", None, None).json()["status"], "ok");

    // SIGTERM stops it cleanly; the credits and usage are in the database
    assert!(server.terminate().success());
    let out = sdkd(&["keys", "list", "--db", &db.display().to_string()]);
    let list = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| -> Vec<String> {
        list.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} not in\n{list}")).split_whitespace().map(String::from).collect()
    };
    assert_eq!(row("alice")[1..3], ["0", "3"], "{list}");
    assert_eq!(row("bob")[1..3], ["5", "0"], "{list}");
    assert_eq!(row("carol")[1..3], ["1", "2"], "{list}");

    // keys are stored hashed: the file holds each key's SHA-256 and never the key itself
    let raw = std::fs::read(&db).unwrap();
    let hashes: Vec<String> = rusqlite::Connection::open(&db)
        .unwrap()
        .prepare("SELECT key_sha256 FROM api_keys ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for key in [&alice, &bob, &carol] {
        assert!(!raw.windows(key.len()).any(|w| w == key.as_bytes()), "a key in plain text in {}", db.display());
        assert!(hashes.contains(&sha256_hex(key)), "the SHA-256 of a key is not in {hashes:?}");
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Two threads, each on its own SQLite connection to one database, released together by a
/// barrier, try to hold a key's last credit for a generation: exactly one gets it, and the balance ends at 0.
/// Many rounds, so that the two statements really meet inside SQLite.
#[test]
fn last_credit_race_has_one_winner() {
    use sdkd::serve::keys::{Hold, KeyStore};
    let dir = tempdir();
    let db = dir.path().join("keys.sqlite");
    let admin = KeyStore::create_or_open(&db).unwrap();
    let key = admin.add("racer", 0).unwrap();
    let rounds = 200;
    for round in 0..rounds {
        assert_eq!(admin.credit("racer", 1).unwrap(), 1);
        let barrier = std::sync::Barrier::new(2);
        let results: Vec<Hold> = std::thread::scope(|s| {
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let store = KeyStore::open(&db).unwrap();
                        barrier.wait();
                        store.hold(&key, 1, 1, "racer").unwrap()
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let won = results.iter().filter(|r| matches!(r, Hold::Held { left: 0, .. })).count();
        let lost = results.iter().filter(|r| matches!(r, Hold::Short { has: 0 })).count();
        assert_eq!((won, lost), (1, 1), "round {round}: {results:?}");
        assert_eq!(admin.credits(&key).unwrap(), Some(0), "round {round}");
    }
}

/// A request the scheduler config cannot serve is refused before any credit is taken (400), and
/// a generation that fails after its credits were taken answers 500 and gives them back. The first
/// with a scheduler config that only Euler refuses (`timestep_type: continuous`): the server loads,
/// UniPC requests work, Euler requests are refused free. The second with a UNet whose `conv_out`
/// weights are finite (so it loads) but 1e38, so the latents overflow: only sampling finds it.
#[test]
fn failed_generation_answers_500_and_refunds() {
    let dir = tempdir();
    let (model, db) = (dir.path().join("pipe"), dir.path().join("keys.sqlite"));
    run_reference("make_pipeline.py", &[&model.display().to_string()]);
    let config_path = model.join("scheduler/scheduler_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["timestep_type"] = json!("continuous");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let dave = add_key(&db, "dave", 3);
    let post = |server: &Server, scheduler: &str| {
        let body = json!({"prompt": PANDA, "scheduler": scheduler, "samples": 2, "img_width": 64, "img_height": 64, "seed": 1});
        http(&server.addr, "POST", "/v1/txt2img", Some(&dave), Some(&body))
    };
    let mut server = Server::start(&model, &db, &dir.path().join("serve.log"), &[]);
    let a = post(&server, "euler");
    assert_eq!((a.status, a.credits()), (400, 3), "{}", String::from_utf8_lossy(&a.body));
    assert!(a.error().contains("timestep_type"), "{}", a.error());
    // the same request with a scheduler that accepts the config is served and paid for
    let a = post(&server, "unipc");
    assert_eq!((a.status, a.credits()), (200, 1), "{}", String::from_utf8_lossy(&a.body));
    assert!(server.terminate().success());

    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    let mut unet = read_tensors(&weights);
    let huge = unet["conv_out.weight"].full_like(1e38);
    unet.insert("conv_out.weight".into(), huge);
    tch::Tensor::write_safetensors(&unet.iter().collect::<Vec<_>>(), &weights).unwrap();
    let out = sdkd(&["keys", "credit", "--db", &db.display().to_string(), "--name", "dave", "--add", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut server = Server::start(&model, &db, &dir.path().join("serve-2.log"), &[]);
    let a = post(&server, "unipc");
    assert_eq!((a.status, a.credits()), (500, 3), "{}", String::from_utf8_lossy(&a.body));
    assert!(a.error().contains("given back") && a.error().contains("not finite"), "{}", a.error());
    assert!(server.terminate().success());
    let out = sdkd(&["keys", "list", "--db", &db.display().to_string()]);
    let list = String::from_utf8_lossy(&out.stdout);
    let row: Vec<&str> = list.lines().find(|l| l.starts_with("dave")).unwrap_or_else(|| panic!("{list}")).split_whitespace().collect();
    assert_eq!(row[1..3], ["3", "2"], "the failed request counted as served:\n{list}");
}

#[test]
fn bad_arguments_fail_cleanly() {
    let dir = tempdir();
    let db = dir.path().join("keys.sqlite");
    let out = sdkd(&["serve", "--model", "/nonexistent/pipe", "--db", &db.display().to_string(), "--device", "cpu"]);
    assert_clean_failure(&out, "/nonexistent/pipe");
    add_key(&db, "alice", 1);
    let out = sdkd(&["keys", "add", "--db", &db.display().to_string(), "--name", "alice"]);
    assert_clean_failure(&out, "alice");
    let out = sdkd(&["keys", "credit", "--db", &db.display().to_string(), "--name", "nobody", "--add", "3"]);
    assert_clean_failure(&out, "nobody");
    let out = sdkd(&["keys", "list", "--db", "/nonexistent/dir/keys.sqlite"]);
    assert_clean_failure(&out, "/nonexistent/dir/keys.sqlite");
}
