//! `sdkd serve` under faults, over the tiny diffusers pipeline (tests/reference/make_pipeline.py):
//! `kill -9` at random instants loses no credit, a client that leaves stops its generation, SIGTERM
//! gives a grace and a second one cancels at once, a full queue answers 503, prices follow the
//! table of docs/serve.md, `/metrics` parses as Prometheus text, and `--max-batch` serves each
//! request of a batch its unbatched image while a member that leaves is refunded. Loopback addresses only;
//! every wait is bounded.
mod common;

use common::serve_http::*;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Held by the tests that time a step or a grace, and by the one whose step keeps both cores
/// busy: run together, that one would slow the others' steps past their bounds.
static TIMED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn timed() -> std::sync::MutexGuard<'static, ()> {
    TIMED.lock().unwrap_or_else(|e| e.into_inner())
}

/// (balance, credits of served rows, states) of key `name`, read from the database itself.
fn ledger(db: &Path, name: &str) -> (i64, i64, BTreeMap<String, i64>) {
    let c = rusqlite::Connection::open(db).unwrap();
    let hash: String = c.query_row("SELECT key_sha256 FROM api_keys WHERE name = ?1", [name], |r| r.get(0)).unwrap();
    let balance = c.query_row("SELECT credits FROM api_keys WHERE key_sha256 = ?1", [&hash], |r| r.get(0)).unwrap();
    let served = c
        .query_row("SELECT COALESCE(SUM(credits), 0) FROM generations WHERE key_sha256 = ?1 AND state = 'served'", [&hash], |r| r.get(0))
        .unwrap();
    let mut stmt = c.prepare("SELECT state, COUNT(*) FROM generations WHERE key_sha256 = ?1 GROUP BY state").unwrap();
    let states = stmt.query_map([&hash], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
    (balance, served, states)
}

fn fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempdir();
    let (model, db) = (dir.path().join("pipe"), dir.path().join("keys.sqlite"));
    run_reference("make_pipeline.py", &[&model.display().to_string()]);
    (dir, model, db)
}

/// 64x64, 20 steps: about a second on the tiny pipeline.
fn small(seed: u64) -> Value {
    json!({"prompt": "a toy panda", "img_width": 64, "img_height": 64, "seed": seed})
}

/// 128x128, 100 steps: tens of seconds, a fraction of a second per step.
fn long() -> Value {
    json!({"prompt": "a toy panda", "img_width": 128, "img_height": 128, "num_inference_steps": 100, "seed": 3})
}

#[test]
fn kill_9_at_20_random_instants_loses_no_credit() {
    let (dir, model, db) = fixture();
    const INITIAL: i64 = 1000;
    let alice = add_key(&db, "alice", INITIAL);
    add_key(&db, "bob", 7); // another key, which no request touches
    // The kill window spans 2.5 small requests as timed here (a third key's, outside alice's
    // ledger), so that some kills land mid-generation and some after an answer at any load: a
    // fixed 1.6 s window saw no request served on a loaded machine.
    let carol = add_key(&db, "carol", 1);
    let mut server = Server::start(&model, &db, &dir.path().join("timing.log"), &[]);
    let t = Instant::now();
    let a = http(&server.addr, "POST", "/v1/txt2img", Some(&carol), Some(&small(99)));
    assert_eq!(a.status, 200, "{}", a.error());
    let window = (t.elapsed().as_secs_f64() * 2.5).max(1.6);
    eprintln!("kill window {window:.2} s");
    server.signal(libc::SIGTERM);
    server.wait_exit(Duration::from_secs(10)).expect("SIGTERM ends it");
    // the instants: a fixed LCG from the clock, printed so a failure can be replayed
    let mut state = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("kill instants seed {state}");
    let mut uniform = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut recovered = 0;
    for round in 0..20 {
        let log = dir.path().join(format!("serve{round}.log"));
        let mut server = Server::start(&model, &db, &log, &[]);
        recovered += server.log().matches("left pending by server instance").count();
        let at = Duration::from_secs_f64(uniform() * window);
        // two clients, each sending requests one after another until the server dies
        let addr = server.addr.clone();
        std::thread::scope(|s| {
            for c in 0..2u64 {
                let (addr, alice) = (&addr, &alice);
                s.spawn(move || {
                    for i in 0..4 {
                        let Ok(stream) = send(addr, "POST", "/v1/txt2img", Some(alice), Some(&small(c * 10 + i))) else { return };
                        match receive(stream) {
                            Ok(a) => assert_eq!(a.status, 200, "{}", a.error()),
                            Err(_) => return, // killed mid-answer
                        }
                    }
                });
            }
            std::thread::sleep(at);
            server.signal(libc::SIGKILL);
            server.wait_exit(Duration::from_secs(10)).expect("kill -9 ends it");
        });
        let (balance, served, states) = ledger(&db, "alice");
        assert!(balance + served <= INITIAL, "round {round}: balance {balance} + served {served} > {INITIAL}: a double refund ({states:?})");
    }
    // the restart after the last kill refunds what it left pending, then exits cleanly
    let log = dir.path().join("final.log");
    let mut server = Server::start(&model, &db, &log, &[]);
    recovered += server.log().matches("left pending by server instance").count();
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).expect("SIGTERM ends it").1.success());
    let (balance, served, states) = ledger(&db, "alice");
    assert_eq!(balance + served, INITIAL, "every credit accounted for: {states:?}");
    assert_eq!(states.get("pending"), None, "{states:?}");
    assert!(states.get("served").copied().unwrap_or(0) > 0, "no request was ever served: {states:?}");
    assert!(recovered > 0, "no kill landed during a generation in 20 rounds: {states:?}");
    // no refund at a restart without a crash
    let again = Server::start(&model, &db, &dir.path().join("again.log"), &[]);
    assert!(!again.log().contains("left pending"), "{}", again.log());
    assert_eq!(ledger(&db, "alice").0, balance);
    assert_eq!(ledger(&db, "bob").0, 7);
}

#[test]
fn a_disconnecting_client_stops_its_generation_within_a_step() {
    let _timed = timed();
    let (dir, model, db) = fixture();
    let alice = add_key(&db, "alice", 10);
    let server = Server::start(&model, &db, &dir.path().join("serve.log"), &[]);
    // one step's time, from a 20-step request of the same size (an upper bound: it includes decoding)
    let mut twenty = long();
    twenty["num_inference_steps"] = json!(20);
    let t = Instant::now();
    let a = http(&server.addr, "POST", "/v1/txt2img", Some(&alice), Some(&twenty));
    let step = t.elapsed() / 20;
    assert_eq!((a.status, a.num("x-credits-charged"), a.num("x-remaining-credits")), (200, 1, 9), "{}", a.error());

    let stream = send(&server.addr, "POST", "/v1/txt2img", Some(&alice), Some(&long())).unwrap();
    std::thread::sleep(step * 5);
    drop(stream);
    let took = server.wait_log("the client disconnected", Duration::from_secs(30)).unwrap_or_else(|| panic!("not cancelled:\n{}", server.log()));
    let log = server.log();
    let line = log.lines().find(|l| l.contains("the client disconnected")).unwrap();
    let done: usize = line.split("after ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(done < 100, "{line}");
    assert!(took <= step * 2 + Duration::from_millis(500), "cancelled {took:?} after the disconnect, one step is {step:?}: {line}");
    assert!(server.wait_log("credit(s) given back", Duration::from_secs(5)).is_some(), "{log}");
    let (balance, served, states) = ledger(&db, "alice");
    assert_eq!((balance, served, states.get("refunded").copied()), (9, 1, Some(1)), "{states:?}");
    // the pipeline is free again at once
    let a = http(&server.addr, "POST", "/v1/txt2img", Some(&alice), Some(&small(1)));
    assert_eq!((a.status, a.num("x-remaining-credits")), (200, 8), "{}", a.error());
}

/// Starts a long request and waits until its credits are held and it runs; its answer, later.
fn start_long(server: &Server, key: &str, db: &Path, name: &str, held_balance: i64) -> std::thread::JoinHandle<Answer> {
    let (addr, key) = (server.addr.clone(), key.to_string());
    let call = std::thread::spawn(move || http(&addr, "POST", "/v1/txt2img", Some(&key), Some(&long())));
    let t = Instant::now();
    while ledger(db, name).0 != held_balance {
        assert!(t.elapsed() < Duration::from_secs(10), "the long request was not taken:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300)); // into its first steps
    call
}

#[test]
fn sigterm_gives_the_grace_then_cancels_and_a_second_one_cancels_at_once() {
    let _timed = timed();
    let (dir, model, db) = fixture();
    let alice = add_key(&db, "alice", 10);

    // one SIGTERM: the request in flight has the grace (2 s), then it is cancelled and refunded
    let mut server = Server::start(&model, &db, &dir.path().join("grace.log"), &["--shutdown-grace", "2"]);
    let call = start_long(&server, &alice, &db, "alice", 9);
    server.signal(libc::SIGTERM);
    let (took, status) = server.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("still running:\n{}", server.log()));
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(took >= Duration::from_secs(2) && took <= Duration::from_secs(3), "exit {took:?} after SIGTERM with a 2 s grace");
    let a = call.join().unwrap();
    assert_eq!((a.status, a.num("x-credits-charged")), (503, 0), "{}", a.error());
    assert!(a.error().contains("shutting down") && a.error().contains("given back"), "{}", a.error());
    assert!(server.log().contains("shutdown grace over"), "{}", server.log());
    assert_eq!(ledger(&db, "alice").0, 10);

    // two SIGTERMs: cancelled at once, whatever the grace
    let mut server = Server::start(&model, &db, &dir.path().join("twice.log"), &[]);
    let call = start_long(&server, &alice, &db, "alice", 9);
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    server.signal(libc::SIGTERM);
    let (took, status) = server.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("still running:\n{}", server.log()));
    assert!(status.success() && took <= Duration::from_secs(1), "exit {took:?} after the second SIGTERM\n{}", server.log());
    let a = call.join().unwrap();
    assert_eq!(a.status, 503, "{}", a.error());
    let (balance, served, states) = ledger(&db, "alice");
    assert_eq!((balance, served, states.get("refunded").copied(), states.get("pending")), (10, 0, Some(2), None), "{states:?}");
}

#[test]
fn a_full_queue_answers_503_and_takes_nothing_and_deadlines_cancel() {
    let _timed = timed();
    let (dir, model, db) = fixture();
    let alice = add_key(&db, "alice", 10);
    let server = Server::start(&model, &db, &dir.path().join("serve.log"), &["--max-queue", "1", "--max-request-seconds", "4"]);
    let running = start_long(&server, &alice, &db, "alice", 9);
    let waiting = start_long(&server, &alice, &db, "alice", 8);
    let metrics = String::from_utf8(http(&server.addr, "GET", "/metrics", None, None).body).unwrap();
    assert!(metrics.lines().any(|l| l == "sdkd_queue_depth 1"), "{metrics}");
    let a = http(&server.addr, "POST", "/v1/txt2img", Some(&alice), Some(&small(1)));
    assert_eq!((a.status, a.num("x-credits-charged"), a.num("x-remaining-credits")), (503, 0, 8), "{}", a.error());
    assert!(a.num("retry-after") >= 1 && a.error().contains("--max-queue 1"), "{:?} {}", a.headers, a.error());
    // --max-request-seconds 4 cuts both (100 steps take far longer), between two steps
    for call in [running, waiting] {
        let a = call.join().unwrap();
        assert_eq!((a.status, a.num("x-credits-charged")), (504, 0), "{}", a.error());
        assert!(a.error().contains("--max-request-seconds 4") && a.error().contains("given back"), "{}", a.error());
    }
    let (balance, served, states) = ledger(&db, "alice");
    assert_eq!((balance, served, states.get("refunded").copied(), states.len()), (10, 0, Some(2), 1), "{states:?}");
}

/// The rows of the price table in docs/serve.md: (samples, steps, width, height, credits).
fn documented_prices() -> Vec<(i64, i64, i64, i64, i64)> {
    let doc = std::fs::read_to_string(root().join("docs/serve.md")).unwrap();
    let table = doc.split("| samples | steps | size | credits |").nth(1).expect("the price table in docs/serve.md");
    let rows: Vec<_> = table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            let (w, h) = cells[2].split_once('×').unwrap();
            let n = |s: &str| s.parse::<i64>().unwrap_or_else(|_| panic!("{s:?} in {l}"));
            (n(cells[0]), n(cells[1]), n(w), n(h), n(cells[3]))
        })
        .collect();
    assert!(rows.len() >= 8, "{rows:?}");
    rows
}

#[test]
fn charges_follow_the_price_table_of_the_docs() {
    let (dir, model, db) = fixture();
    add_key(&db, "first", 0);
    let server = Server::start(&model, &db, &dir.path().join("serve.log"), &[]);
    for (i, (samples, steps, width, height, credits)) in documented_prices().into_iter().enumerate() {
        let body = json!({"prompt": "a toy panda", "samples": samples, "num_inference_steps": steps, "img_width": width, "img_height": height, "seed": 1});
        // one credit short: 406, the message states the price, nothing taken
        let short = add_key(&db, &format!("short{i}"), credits - 1);
        let a = http(&server.addr, "POST", "/v1/txt2img", Some(&short), Some(&body));
        assert_eq!((a.status, a.num("x-credits-charged"), a.num("x-remaining-credits")), (406, 0, credits - 1), "{body}: {}", a.error());
        assert!(a.error().contains(&format!("cost {credits},")), "{body}: {}", a.error());
        // exactly enough: served (the small sizes; the others take minutes on a CPU)
        if width * height <= 64 * 64 {
            let rich = add_key(&db, &format!("exact{i}"), credits);
            let a = http(&server.addr, "POST", "/v1/txt2img", Some(&rich), Some(&body));
            assert_eq!((a.status, a.num("x-credits-charged"), a.num("x-remaining-credits")), (200, credits, 0), "{body}: {}", a.error());
        }
    }
    // a price table from a file
    let pricing = dir.path().join("pricing.yaml");
    std::fs::write(&pricing, "credits: 3\nsteps: 20\nwidth: 64\nheight: 64\n").unwrap();
    drop(server);
    let server = Server::start(&model, &db, &dir.path().join("priced.log"), &["--pricing", &pricing.display().to_string()]);
    let key = add_key(&db, "priced", 20);
    let a = http(&server.addr, "POST", "/v1/txt2img", Some(&key), Some(&json!({"prompt": "x", "samples": 2, "img_width": 64, "img_height": 128, "seed": 1})));
    assert_eq!((a.status, a.num("x-credits-charged"), a.num("x-remaining-credits")), (200, 12, 8), "{}", a.error());
    std::fs::write(&pricing, "credits: 3\nsteps: 0\nwidth: 64\nheight: 64\n").unwrap();
    let out = sdkd(&["serve", "--model", &model.display().to_string(), "--db", &db.display().to_string(), "--device", "cpu", "--pricing", &pricing.display().to_string()]);
    assert_clean_failure(&out, "steps = 0");
    for (flag, value) in [("--max-queue", "0"), ("--shutdown-grace", "-1"), ("--max-request-seconds", "nan")] {
        let out = sdkd(&["serve", "--model", &model.display().to_string(), "--db", &db.display().to_string(), flag, value]);
        assert_clean_failure(&out, flag);
    }
}

#[test]
fn metrics_parse_as_prometheus_text_and_keys_revoke_and_usage() {
    let (dir, model, db) = fixture();
    let alice = add_key(&db, "alice", 5);
    let server = Server::start(&model, &db, &dir.path().join("serve.log"), &[]);
    let a = http(&server.addr, "POST", "/v1/txt2img", Some(&alice), Some(&json!({"prompt": "x", "samples": 2, "img_width": 64, "img_height": 64, "seed": 1})));
    assert_eq!(a.status, 200, "{}", a.error());
    assert_eq!(http(&server.addr, "POST", "/v1/txt2img", Some(&alice), Some(&json!({"prompt": "x", "samples": 9}))).status, 400);
    assert_eq!(http(&server.addr, "POST", "/v1/txt2img", None, Some(&small(1))).status, 401);
    let text = http(&server.addr, "GET", "/metrics", None, None);
    assert!(text.header("content-type").starts_with("text/plain; version=0.0.4"), "{:?}", text.headers);
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text.body).unwrap();
    // prometheus_client's own parser reads it; its samples come back as JSON
    let parse = "import sys, json\nfrom prometheus_client.parser import text_string_to_metric_families as parse\n\
                 out = {}\nfor f in parse(open(sys.argv[1]).read()):\n    for s in f.samples:\n        \
                 out[s.name + json.dumps(s.labels, sort_keys=True)] = [f.type, s.value]\nprint(json.dumps(out))";
    let out = python_command().args(["-c", parse, &file.display().to_string()]).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&text.body));
    let samples: BTreeMap<String, (String, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    let get = |k: &str| samples.get(k).unwrap_or_else(|| panic!("{k} not in {samples:?}")).clone();
    assert_eq!(get(r#"sdkd_http_requests_total{"code": "200"}"#), ("counter".into(), 1.0));
    assert_eq!(get(r#"sdkd_http_requests_total{"code": "400"}"#).1, 1.0);
    assert_eq!(get(r#"sdkd_http_requests_total{"code": "401"}"#).1, 1.0);
    assert_eq!(get(r#"sdkd_http_request_duration_seconds_count{}"#), ("histogram".into(), 3.0));
    assert_eq!(get(r#"sdkd_http_request_duration_seconds_bucket{"le": "+Inf"}"#).1, 3.0);
    assert_eq!(get(r#"sdkd_queue_depth{}"#), ("gauge".into(), 0.0));
    assert_eq!(get(r#"sdkd_images_total{}"#).1, 2.0);
    assert_eq!(get(r#"sdkd_credits_charged_total{}"#).1, 2.0);
    assert_eq!(get(r#"sdkd_credits_refunded_total{}"#).1, 0.0);
    assert_eq!(get(r#"sdkd_batch_size_count{}"#), ("histogram".into(), 1.0));
    assert_eq!(get(r#"sdkd_batch_size_bucket{"le": "1"}"#).1, 1.0);

    // revoked: 401 from now on, the balance and rows kept
    let d = db.display().to_string();
    let out = sdkd(&["keys", "revoke", "--db", &d, "--name", "alice"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a = http(&server.addr, "POST", "/v1/txt2img", Some(&alice), Some(&small(1)));
    assert_eq!((a.status, a.num("x-remaining-credits")), (401, 3), "{}", a.error());
    assert!(a.error().contains("revoked"), "{}", a.error());
    assert_clean_failure(&sdkd(&["keys", "revoke", "--db", &d, "--name", "nobody"]), "nobody");
    let list = String::from_utf8(sdkd(&["keys", "list", "--db", &d]).stdout).unwrap();
    assert!(list.lines().any(|l| l.starts_with("alice") && l.ends_with("revoked")), "{list}");
    // usage: the one served generation, with its credits and images
    let out = sdkd(&["keys", "usage", "--db", &d, "--name", "alice"]);
    let usage = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<Vec<&str>> = usage.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 1, "{usage}");
    assert_eq!(rows[0][2..6], ["served", "2", "2", "200"], "{usage}");
    assert_clean_failure(&sdkd(&["keys", "usage", "--db", &d, "--name", "nobody"]), "nobody");
}

fn pixels(a: &Answer) -> image::RgbImage {
    assert_eq!(a.status, 200, "{}", a.error());
    image::load_from_memory(&a.body).unwrap().to_rgb8()
}

#[test]
fn batched_requests_get_their_unbatched_pixels_and_a_leaving_member_is_refunded() {
    let (dir, model, db) = fixture();
    let alice = add_key(&db, "alice", 1000);
    let server = Server::start(&model, &db, &dir.path().join("serve.log"), &["--max-batch", "4"]);
    // Euler ancestral and DDPM draw noise at every step: each request must keep its own sequence.
    // Prompts, seeds and guidance scales differ within a batch; size, steps and scheduler do not.
    let request = |scheduler: &str, steps: i64, i: u64| {
        json!({"prompt": format!("a toy panda, take {i}"), "scheduler": scheduler, "num_inference_steps": steps,
               "guidance_scale": 2.0 + i as f64, "seed": 40 + i, "img_width": 64, "img_height": 64, "base64": false})
    };
    let euler_a: Vec<Value> = (0..4).map(|i| request("euler_a", 30, i)).collect();
    let ddpm: Vec<Value> = (4..6).map(|i| request("ddpm", 20, i)).collect();

    // a longer request holds the model while the others queue (alternating shapes); then they run
    // as two batches: the four Euler ones (one of which leaves), then the two DDPM ones
    let blocker = {
        let (addr, key) = (server.addr.clone(), alice.clone());
        let body = json!({"prompt": "a toy panda", "img_width": 64, "img_height": 64, "num_inference_steps": 50, "seed": 3});
        std::thread::spawn(move || http(&addr, "POST", "/v1/txt2img", Some(&key), Some(&body)))
    };
    let wait_balance = |balance: i64| {
        let t = Instant::now();
        while ledger(&db, "alice").0 != balance {
            assert!(t.elapsed() < Duration::from_secs(10), "balance not {balance}:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_balance(999);
    let mut streams = vec![];
    for body in [&euler_a[0], &ddpm[0], &euler_a[1], &ddpm[1], &euler_a[2], &euler_a[3]] {
        streams.push(send(&server.addr, "POST", "/v1/txt2img", Some(&alice), Some(body)).unwrap());
        wait_balance(999 - streams.len() as i64); // one credit each, held in arrival order
    }
    let leaving = streams.pop().unwrap(); // euler_a[3]
    let answers: Vec<std::thread::JoinHandle<Answer>> = streams.into_iter().map(|s| std::thread::spawn(move || receive(s).unwrap())).collect();
    assert_eq!(blocker.join().unwrap().status, 200);
    assert!(server.wait_log("batch of 4", Duration::from_secs(30)).is_some(), "{}", server.log());
    std::thread::sleep(Duration::from_millis(500)); // a few steps into the batch
    drop(leaving);
    let answers: Vec<Answer> = answers.into_iter().map(|h| h.join().unwrap()).collect();
    let log = server.log();
    let batches: Vec<&str> = log.lines().filter(|l| l.starts_with("batch of")).collect();
    assert_eq!(batches.len(), 2, "{log}");
    assert!(batches[0].starts_with("batch of 4") && batches[1].starts_with("batch of 2"), "{log}");
    let cancelled = log.lines().find(|l| l.contains("the client disconnected")).unwrap_or_else(|| panic!("{log}"));
    let done: usize = cancelled.split("after ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(done < 30, "{cancelled}");

    // each answer equals the same request served alone (a batch of one)
    let served: Vec<image::RgbImage> = answers.iter().map(pixels).collect();
    let order = [&euler_a[0], &ddpm[0], &euler_a[1], &ddpm[1], &euler_a[2]];
    for (got, body) in served.iter().zip(order) {
        let alone = pixels(&http(&server.addr, "POST", "/v1/txt2img", Some(&alice), Some(body)));
        assert!(*got == alone, "{body}: the batched image differs from the unbatched one");
    }
    assert_ne!(served[0], served[2], "two requests of one batch got one image");
    // 1 credit each: the blocker, 5 batched, 5 alone; the leaving member's came back
    let (balance, _, states) = ledger(&db, "alice");
    assert_eq!((balance, states.get("served").copied(), states.get("refunded").copied()), (1000 - 11, Some(11), Some(1)), "{states:?}");
    let metrics = String::from_utf8(http(&server.addr, "GET", "/metrics", None, None).body).unwrap();
    for line in ["sdkd_batch_size_bucket{le=\"1\"} 6", "sdkd_batch_size_bucket{le=\"2\"} 7", "sdkd_batch_size_bucket{le=\"4\"} 8", "sdkd_batch_size_sum 12"] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in\n{metrics}");
    }
}

/// A second SIGTERM ends the server within about a second even while one denoising step lasts
/// far longer (1024² on the tiny pipeline, whose VAE downsamples by 2: a 512² latent, a step of
/// over a minute here): the request is refunded, and the balance is whole after a restart.
#[test]
fn a_second_sigterm_ends_the_server_during_a_step_far_longer_than_a_second() {
    let _timed = timed();
    let (dir, model, db) = fixture();
    const INITIAL: i64 = 100_000;
    let alice = add_key(&db, "alice", INITIAL);
    let mut server = Server::start(&model, &db, &dir.path().join("slow.log"), &[]);
    let big = json!({"prompt": "a toy panda", "img_width": 1024, "img_height": 1024, "num_inference_steps": 20, "seed": 1});
    let call = {
        let (addr, key) = (server.addr.clone(), alice.clone());
        std::thread::spawn(move || send(&addr, "POST", "/v1/txt2img", Some(&key), Some(&big)).and_then(receive))
    };
    let t = Instant::now();
    while ledger(&db, "alice").0 == INITIAL {
        assert!(t.elapsed() < Duration::from_secs(20), "the request was not taken:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1500)); // inside its first step
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    server.signal(libc::SIGTERM);
    let (took, status) = server.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("still running:\n{}", server.log()));
    assert!(took <= Duration::from_secs(2), "exit {took:?} after the second SIGTERM\n{}", server.log());
    assert!(status.success(), "{status:?}\n{}", server.log());
    if let Ok(a) = call.join().unwrap() {
        assert_eq!(a.status, 503, "{}", a.error());
        assert!(a.error().contains("given back"), "{}", a.error());
    }
    let (balance, served, states) = ledger(&db, "alice");
    assert_eq!((balance, served, states.get("pending")), (INITIAL, 0, None), "refunded before exit: {states:?}");
    // a restart finds nothing to recover, and the balance stays whole
    let mut again = Server::start(&model, &db, &dir.path().join("again.log"), &[]);
    assert!(!again.log().contains("left pending"), "{}", again.log());
    again.signal(libc::SIGTERM);
    again.wait_exit(Duration::from_secs(10)).expect("SIGTERM ends it");
    assert_eq!(ledger(&db, "alice").0, INITIAL);
}
