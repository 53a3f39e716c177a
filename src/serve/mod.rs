//! `sdkd serve`: a text-to-image HTTP API in the style of Segmind's SD-Small/SD-Tiny API (docs/serve.md).
//!
//! `POST /v1/txt2img` with the key in `x-api-key` and a JSON body (`request.rs`), priced by
//! `pricing.rs`, paid from the ledger of `keys.rs` (credits held before generating, kept when the
//! images are delivered, given back otherwise). Every answer carries `x-remaining-credits` (0
//! without a valid key) and `x-credits-charged`. Errors are `{"error": "<message>"}`; the status
//! codes are in docs/serve.md. `GET /metrics` reports in Prometheus' text format.
//!
//! The model runs on one thread of its own (one pipeline; LibTorch already uses every core for
//! one image), taking the oldest waiting request and, with `--max-batch N`, up to N - 1 waiting
//! requests that batch with it (`GenerateRequest::batches_with`) into one batched generation;
//! the HTTP side keeps answering meanwhile. Each request has a cancellation token that the
//! pipeline asks before every denoising step: the client going away, `--max-request-seconds` and
//! shutdown end that request within one step (it leaves its batch), and its credits return.
pub mod keys;
pub mod metrics;
pub mod pricing;
pub mod request;

use crate::grid::grid;
use crate::pipeline::{generate_batch, BatchMember, Cancelled, GenerateRequest, TextToImage};
use crate::png_meta::png_bytes;
use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use keys::{Hold, KeyState, KeyStore};
use metrics::Metrics;
use pricing::Pricing;
use request::Txt2Img;
use serde_json::json;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const KEY_HEADER: &str = "x-api-key";
pub const CREDITS_HEADER: &str = "x-remaining-credits";
pub const CHARGED_HEADER: &str = "x-credits-charged";
const UNKNOWN_KEY: &str = "authentication failed: unknown API key";
const REVOKED_KEY: &str = "authentication failed: this API key was revoked";

/// The server's limits (`sdkd serve` flags).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Requests that may wait for the pipeline; one more is answered 503.
    pub max_queue: usize,
    /// A request still unfinished this long after it arrived is cancelled (504).
    pub max_request: Option<Duration>,
    /// After SIGTERM/SIGINT, how long requests in flight may still finish.
    pub shutdown_grace: Duration,
    /// Requests generated together in one batched UNet call per step (1: one at a time).
    pub max_batch: usize,
}

/// What the handlers share.
pub struct App {
    pipeline: Mutex<TextToImage>,
    keys: Mutex<KeyStore>,
    /// This process's id in the ledger (`keys::KeyStore::start_instance`).
    instance: String,
    /// What the PNG text chunks and `/v1/health` call the model.
    model: String,
    /// The VAE's downscale factor: image sides must be multiples of it.
    vae_factor: i64,
    /// The pipeline's noise schedule: a request's sampler is built from it before it queues.
    schedule: Arc<crate::schedulers::NoiseSchedule>,
    pricing: Pricing,
    limits: Limits,
    /// Requests admitted and not yet running.
    waiting: AtomicUsize,
    /// How long the last generation took, in ms: the `Retry-After` estimate.
    last_run_ms: AtomicU64,
    /// Set when shutdown cancels every request.
    shutting_down: AtomicBool,
    /// Told (true) when shutdown cancels every request: the handlers still waiting settle their
    /// request themselves if the model thread is inside a step longer than [`STEP_WAIT`].
    cancel_all: tokio::sync::watch::Sender<bool>,
    /// Admitted requests for the model thread, oldest first, and whether it should stop once
    /// they are done (set when the HTTP side has stopped).
    jobs: Mutex<(VecDeque<Job>, bool)>,
    new_job: Condvar,
    metrics: Metrics,
}

/// A request for the model thread: its queue place, token, ledger row and price, and where its
/// answer goes (the handler awaits it; nobody does once the client left).
struct Job {
    slot: QueueSlot,
    token: Arc<Token>,
    id: i64,
    price: i64,
    api: Txt2Img,
    req: GenerateRequest,
    reply: tokio::sync::oneshot::Sender<Response>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a panic in one request must not take the server down with a poisoned lock
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl App {
    /// The app over `pipeline` and `keys`, registered in the ledger as a new instance; the
    /// pending generations of instances that no longer run are refunded first (and logged).
    pub fn new(pipeline: TextToImage, keys: KeyStore, model: String, pricing: Pricing, limits: Limits) -> Result<Arc<App>> {
        let instance = keys::new_instance_id()?;
        for r in keys.start_instance(&instance).context("key database: refunding unfinished generations")? {
            eprintln!(
                "refunded {} credit(s) of {} generation(s) left pending by server instance {} (no longer running)",
                r.credits, r.generations, r.instance
            );
        }
        let vae_factor = pipeline.vae.model.config.downscale_factor();
        let schedule = Arc::clone(&pipeline.schedule);
        Ok(Arc::new(App {
            pipeline: Mutex::new(pipeline),
            keys: Mutex::new(keys),
            instance,
            model,
            vae_factor,
            schedule,
            pricing,
            limits,
            waiting: AtomicUsize::new(0),
            last_run_ms: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            cancel_all: tokio::sync::watch::channel(false).0,
            jobs: Mutex::new((VecDeque::new(), false)),
            new_job: Condvar::new(),
            metrics: Metrics::default(),
        }))
    }
}

/// How long a cancelled request (shutdown, `--max-request-seconds`) waits for the model thread to
/// reach the end of its denoising step; past it the request is refunded and answered without it,
/// and at shutdown the process leaves the step unfinished. One step of a large image on a small
/// machine can last minutes.
const STEP_WAIT: Duration = Duration::from_millis(500);

/// Why a request stopped: the HTTP status and the message naming the cause.
struct Stop {
    status: StatusCode,
    cause: String,
}

/// One request's cancellation token.
struct Token {
    app: Arc<App>,
    deadline: Option<Instant>,
    /// Set when the handler's future is dropped: hyper saw the connection close.
    client_gone: AtomicBool,
}

impl Token {
    fn stop(&self) -> Option<Stop> {
        if self.client_gone.load(Ordering::SeqCst) {
            return Some(Stop { status: StatusCode::INTERNAL_SERVER_ERROR, cause: "the client disconnected".into() });
        }
        if self.app.shutting_down.load(Ordering::SeqCst) {
            return Some(Stop { status: StatusCode::SERVICE_UNAVAILABLE, cause: "the server is shutting down".into() });
        }
        match (self.deadline, self.app.limits.max_request) {
            (Some(deadline), Some(limit)) if Instant::now() >= deadline => Some(Stop {
                status: StatusCode::GATEWAY_TIMEOUT,
                cause: format!("the request ran past --max-request-seconds {}", limit.as_secs_f64()),
            }),
            _ => None,
        }
    }
}

/// Cancels the request when the handler's future is dropped before it answered.
struct ClientWatch(Arc<Token>);

impl Drop for ClientWatch {
    fn drop(&mut self) {
        self.0.client_gone.store(true, Ordering::SeqCst);
    }
}

/// A place in the queue (`App::waiting`), taken by the handler and moved to the worker: given
/// back when the request starts running, or when it ends without having run.
struct QueueSlot {
    app: Arc<App>,
    held: bool,
}

impl QueueSlot {
    fn leave(&mut self) {
        if std::mem::take(&mut self.held) {
            self.app.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.leave();
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn api_key(headers: &HeaderMap) -> Option<String> {
    headers.get(KEY_HEADER).and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

pub fn router(app: Arc<App>) -> Router {
    let method_not_allowed = || async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed") };
    Router::new()
        .route("/v1/txt2img", post(txt2img).fallback(method_not_allowed))
        .route("/v1/health", get(health).fallback(method_not_allowed))
        .route("/metrics", get(metrics_text).fallback(method_not_allowed))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "unknown URL: the API is POST /v1/txt2img") })
        .layer(middleware::from_fn_with_state(app.clone(), every_answer))
        .with_state(app)
}

/// Adds `x-remaining-credits` and `x-credits-charged` (0 unless the handler charged) to every
/// answer, counts it in the metrics and logs it.
async fn every_answer(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let key = api_key(req.headers());
    let mut response = next.run(req).await;
    let credits = key.and_then(|k| lock(&app.keys).credits(&k).ok().flatten()).unwrap_or(0);
    let headers = response.headers_mut();
    headers.insert(CREDITS_HEADER, HeaderValue::from(credits));
    if !headers.contains_key(CHARGED_HEADER) {
        headers.insert(CHARGED_HEADER, HeaderValue::from(0));
    }
    let elapsed = started.elapsed();
    app.metrics.answered(response.status().as_u16(), elapsed);
    eprintln!("{method} {path} -> {} in {:.2}s", response.status().as_u16(), elapsed.as_secs_f64());
    response
}

async fn health(State(app): State<Arc<App>>) -> Response {
    Json(json!({ "status": "ok", "model": app.model })).into_response()
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let text = app.metrics.render(app.waiting.load(Ordering::SeqCst));
    ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

fn retry_after(app: &App) -> HeaderValue {
    let waiting = app.waiting.load(Ordering::SeqCst) as u64 + 1;
    HeaderValue::from((app.last_run_ms.load(Ordering::SeqCst) * waiting).div_ceil(1000).max(1))
}

async fn txt2img(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = Instant::now();
    let Some(key) = api_key(&headers) else {
        return error(StatusCode::UNAUTHORIZED, format!("authentication failed: send your API key in the {KEY_HEADER} header"));
    };
    let state = lock(&app.keys).key_state(&key);
    match state {
        Ok(KeyState::Active { .. }) => {}
        Ok(KeyState::Unknown) => return error(StatusCode::UNAUTHORIZED, UNKNOWN_KEY),
        Ok(KeyState::Revoked) => return error(StatusCode::UNAUTHORIZED, REVOKED_KEY),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("key database: {e:#}")),
    }
    let api = match Txt2Img::parse(&body) {
        Ok(api) => api,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    };
    let req = match api.to_generate_request() {
        Ok(req) => req,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    };
    for (name, v) in [("img_width", api.img_width), ("img_height", api.img_height)] {
        if v % app.vae_factor != 0 {
            return error(StatusCode::BAD_REQUEST, format!("{name} = {v}: must be a multiple of this model's VAE factor {}", app.vae_factor));
        }
    }
    // what the scheduler config makes impossible (LCM: more steps than original_inference_steps)
    if let Err(e) = req.scheduler.build(&app.schedule, req.steps) {
        return error(StatusCode::BAD_REQUEST, format!("scheduler {} with num_inference_steps = {}: {e:#}", req.scheduler, req.steps));
    }

    // a place in the queue before any credit is taken: a full queue costs nothing
    let admitted = app.waiting.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| (w < app.limits.max_queue).then_some(w + 1));
    if admitted.is_err() {
        let mut response = error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the queue is full ({} requests waiting, --max-queue {}): try again later", app.limits.max_queue, app.limits.max_queue),
        );
        response.headers_mut().insert("retry-after", retry_after(&app));
        return response;
    }
    let slot = QueueSlot { app: app.clone(), held: true };

    let n = req.samples as i64;
    let price = app.pricing.price(n, req.steps as i64, api.img_width, api.img_height);
    let held = lock(&app.keys).hold(&key, price, n, &app.instance);
    let generation = match held {
        Ok(Hold::Held { id, .. }) => id,
        Ok(Hold::Short { has }) => {
            return error(
                StatusCode::NOT_ACCEPTABLE,
                format!(
                    "not enough credits: {n} sample(s) of {} steps at {}x{} cost {price}, the key has {has}",
                    req.steps, api.img_width, api.img_height
                ),
            );
        }
        // the key was removed or revoked since it was checked above
        Ok(Hold::UnknownKey) => return error(StatusCode::UNAUTHORIZED, UNKNOWN_KEY),
        Ok(Hold::Revoked) => return error(StatusCode::UNAUTHORIZED, REVOKED_KEY),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("key database: {e:#}")),
    };
    let token = Arc::new(Token {
        app: app.clone(),
        deadline: app.limits.max_request.map(|d| arrived + d),
        client_gone: AtomicBool::new(false),
    });
    let _watch = ClientWatch(token.clone());
    // the model thread settles the ledger itself: the answer is the same whether anyone awaits it
    let (reply, mut answer) = tokio::sync::oneshot::channel();
    let deadline = token.deadline;
    lock(&app.jobs).0.push_back(Job { slot, token, id: generation, price, api, req, reply });
    app.new_job.notify_one();
    let lost = |_| error(StatusCode::INTERNAL_SERVER_ERROR, "the model thread ended without answering");
    // the model thread stops a cancelled request between two steps; past STEP_WAIT the handler
    // settles it itself (a refund, only if still pending: the model thread may have settled it)
    let mut shutdown = app.cancel_all.subscribe();
    let overdue = async {
        let past_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let stop = tokio::select! {
            _ = async { while !*shutdown.borrow_and_update() { if shutdown.changed().await.is_err() { std::future::pending::<()>().await } } } => {
                Stop { status: StatusCode::SERVICE_UNAVAILABLE, cause: "the server is shutting down".into() }
            }
            _ = past_deadline => Stop {
                status: StatusCode::GATEWAY_TIMEOUT,
                cause: format!("the request ran past --max-request-seconds {}", app.limits.max_request.unwrap_or_default().as_secs_f64()),
            },
        };
        tokio::time::sleep(STEP_WAIT).await;
        stop
    };
    tokio::select! {
        a = &mut answer => a.unwrap_or_else(lost),
        stop = overdue => {
            let message = format!("generation cancelled ({}) during a denoising step", stop.cause);
            let refunded = lock(&app.keys).refund(generation, stop.status.as_u16(), &message); // the lock is not held below
            match refunded {
                Ok(true) => {
                    app.metrics.refunded(price as u64);
                    eprintln!("generation {generation}: {message}; {price} credit(s) given back");
                    error(stop.status, format!("{message}; its {price} credit(s) were given back"))
                }
                _ => answer.await.unwrap_or_else(lost),
            }
        }
    }
}

/// The model thread: takes the oldest job and the waiting ones that batch with it, generates
/// them, settles and answers each; returns when the HTTP side has stopped and no job is left.
fn model_thread(app: &App) {
    loop {
        let pipeline = lock(&app.pipeline);
        let batch = {
            let mut jobs = lock(&app.jobs);
            while jobs.0.is_empty() {
                if jobs.1 {
                    return;
                }
                jobs = app.new_job.wait(jobs).unwrap_or_else(|e| e.into_inner());
            }
            take_batch(&mut jobs.0, app.limits.max_batch, |req| pipeline.parts().batches_exactly(req))
        };
        run_batch(app, &pipeline, batch);
    }
}

/// The oldest job and, when it `batches_exactly`, up to `max_batch - 1` more that batch with it,
/// in arrival order (a later request may so pass an earlier one of another shape; the oldest
/// always goes first).
fn take_batch(jobs: &mut VecDeque<Job>, max_batch: usize, batches_exactly: impl Fn(&GenerateRequest) -> bool) -> Vec<Job> {
    let first = jobs.pop_front().expect("a job to take");
    let mut batch = vec![first];
    if max_batch > 1 && batches_exactly(&batch[0].req) {
        let mut i = 0;
        while i < jobs.len() && batch.len() < max_batch {
            if jobs[i].req.batches_with(&batch[0].req) {
                batch.push(jobs.remove(i).expect("index in range"));
            } else {
                i += 1;
            }
        }
    }
    batch
}

/// Generates `batch` (their credits held) and settles each job as it ends: served with its
/// images, or refunded with a 5xx naming the cause.
fn run_batch(app: &App, pipeline: &TextToImage, batch: Vec<Job>) {
    let started = Instant::now();
    let (mut settle, mut members_of) = (vec![], vec![]);
    for mut job in batch {
        job.slot.leave();
        members_of.push((job.token, job.req));
        settle.push(Some((job.id, job.price, job.api, job.reply)));
    }
    if members_of.len() > 1 {
        let ids: Vec<String> = settle.iter().flatten().map(|s| s.0.to_string()).collect();
        eprintln!("batch of {}: generations {}", ids.len(), ids.join(", "));
    }
    app.metrics.batch(members_of.len());
    let stops: Vec<Box<dyn Fn() -> Option<String> + '_>> =
        members_of.iter().map(|(token, _)| Box::new(move || token.stop().map(|s| s.cause)) as Box<dyn Fn() -> Option<String>>).collect();
    let members: Vec<BatchMember> = members_of.iter().zip(&stops).map(|((_, req), stop)| BatchMember { req, stop: stop.as_ref(), noise: None }).collect();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        generate_batch(&pipeline.parts(), &members, &mut |_, _| {}, &mut |i, images| {
            let Some((id, price, api, reply)) = settle[i].take() else { return };
            let (token, req) = &members_of[i];
            let response = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                images.and_then(|images| encode(app, &api, req, images, &pipeline.parts().truncated_prompts(req)))
            }))
            .unwrap_or_else(|panic| Err(anyhow::anyhow!("encoding the images panicked: {}", panic_text(&*panic))));
            let _ = reply.send(settle_one(app, token, id, price, req, response)); // nobody listens once the client left
        });
    }));
    // a panic in LibTorch is the failure of every request it left unsettled, settled here
    if let Err(panic) = caught {
        for (i, entry) in settle.iter_mut().enumerate() {
            if let Some((id, price, _, reply)) = entry.take() {
                let (token, req) = &members_of[i];
                let failed = Err(anyhow::anyhow!("the pipeline panicked: {}", panic_text(&*panic)));
                let _ = reply.send(settle_one(app, token, id, price, req, failed));
            }
        }
    }
    app.last_run_ms.store(started.elapsed().as_millis() as u64, Ordering::SeqCst);
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Settles generation `id` with its `result`: served (the price kept) or refunded.
fn settle_one(app: &App, token: &Token, id: i64, price: i64, req: &GenerateRequest, result: Result<Response>) -> Response {
    let (status, message) = match result {
        Ok(mut response) => match lock(&app.keys).served(id) {
            Ok(true) => {
                app.metrics.served(req.samples as u64, price as u64);
                response.headers_mut().insert(CHARGED_HEADER, HeaderValue::from(price));
                return response;
            }
            Ok(false) => (StatusCode::INTERNAL_SERVER_ERROR, format!("generation {id} was settled elsewhere; not delivered")),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("key database: {e:#}")),
        },
        Err(e) => match e.downcast_ref::<Cancelled>() {
            Some(c) => {
                eprintln!("generation {id}: {c}");
                let status = token.stop().map(|s| s.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                (status, format!("generation cancelled ({}) after {} of {} steps", c.cause, c.done, c.total))
            }
            None => (StatusCode::INTERNAL_SERVER_ERROR, format!("generation failed: {e:#}")),
        },
    };
    match lock(&app.keys).refund(id, status.as_u16(), &message) {
        Ok(true) => {
            app.metrics.refunded(price as u64);
            eprintln!("generation {id}: {price} credit(s) given back");
            error(status, format!("{message}; its {price} credit(s) were given back"))
        }
        Ok(false) => error(status, message),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{message}; key database: {e:#}")),
    }
}

/// The answer for generated `images`: JSON with base64 PNGs, or one PNG (several samples side
/// by side). The PNGs carry how they were made as text chunks, as `sdkd generate` writes them.
/// `truncated` lists the prompt parts CLIP's token limit cut off (JSON answers report them).
fn encode(
    app: &App,
    api: &Txt2Img,
    req: &GenerateRequest,
    images: Vec<image::RgbImage>,
    truncated: &[(&str, String)],
) -> Result<Response> {
    let mut text = req.png_text(api.img_width, api.img_height, app.model.clone());
    text.push(("Software", format!("sdkd {}", env!("CARGO_PKG_VERSION"))));
    let seed = HeaderValue::from(req.seed);
    if api.base64 {
        let b64 = base64::engine::general_purpose::STANDARD;
        let encoded = images.iter().map(|im| png_bytes(im, &text).map(|png| b64.encode(png))).collect::<Result<Vec<_>>>()?;
        let mut body = json!({
            "images": encoded,
            "seed": req.seed,
            "scheduler": req.scheduler.name(),
            "num_inference_steps": req.steps,
            "guidance_scale": req.guidance_scale,
            "img_width": api.img_width,
            "img_height": api.img_height,
            "samples": images.len(),
        });
        if !truncated.is_empty() {
            // the JSON names of the request: prompt, negative_prompt
            body["truncated"] = truncated.iter().map(|(name, dropped)| (name.to_string(), json!(dropped))).collect();
        }
        let mut response = Json(body).into_response();
        response.headers_mut().insert("x-seed", seed);
        return Ok(response);
    }
    let image = if images.len() == 1 { images.into_iter().next().expect("one image") } else { grid(&[images]) };
    let png = png_bytes(&image, &text)?;
    Response::builder()
        .header("content-type", "image/png")
        .header("x-seed", seed)
        .body(Body::from(png))
        .context("building the response")
}

/// Serves `app` on `listen` until SIGINT or SIGTERM; prints `listening on http://<addr>` (the
/// bound address: port 0 picks a free one) to stdout first. The first signal stops accepting and
/// gives the requests in flight `--shutdown-grace`; then, or at a second signal, they are
/// cancelled (and refunded).
pub fn serve(app: Arc<App>, listen: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let model = std::thread::Builder::new().name("model".into()).spawn({
        let app = app.clone();
        move || model_thread(&app)
    })?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("--listen {listen}: cannot listen there"))?;
        let addr = listener.local_addr()?;
        let (stop_accepting, stopped) = tokio::sync::oneshot::channel::<()>();
        // the handlers exist before anyone is told where to connect: an early SIGTERM is graceful too
        use tokio::signal::unix::{signal, SignalKind};
        let (term, int) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
        let (term, int) = (term.context("listening for SIGTERM")?, int.context("listening for SIGINT")?);
        tokio::spawn(signals(app.clone(), term, int, stop_accepting));
        println!("listening on http://{addr} (POST /v1/txt2img)");
        use std::io::Write;
        std::io::stdout().flush()?;
        axum::serve(listener, router(app.clone()))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .context("serving")
    });
    // jobs whose clients left may still run or wait: stop them at their next step, settle them
    app.shutting_down.store(true, Ordering::SeqCst);
    app.cancel_all.send_replace(true);
    lock(&app.jobs).1 = true;
    app.new_job.notify_all();
    let waited = Instant::now();
    while !model.is_finished() && waited.elapsed() < STEP_WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !model.is_finished() {
        // inside a step longer than STEP_WAIT: settle what it holds and leave without it (its
        // LibTorch call cannot be interrupted, and exit's destructors must not run under it)
        let (generations, credits) = lock(&app.keys).refund_instance(&app.instance, "the server stopped during its denoising step")?;
        lock(&app.keys).stop_instance(&app.instance)?;
        eprintln!("stopped during a denoising step: {credits} credit(s) of {generations} generation(s) given back; exiting");
        use std::io::Write;
        let _ = (std::io::stdout().flush(), std::io::stderr().flush());
        // SAFETY: _exit ends the process at once; nothing after it runs
        unsafe { libc::_exit(if served.is_ok() { 0 } else { 1 }) }
    }
    if model.join().is_err() {
        eprintln!("the model thread panicked outside a generation");
    }
    runtime.shutdown_timeout(Duration::from_secs(600));
    lock(&app.keys).stop_instance(&app.instance)?;
    served
}

async fn signals(
    app: Arc<App>,
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    stop_accepting: tokio::sync::oneshot::Sender<()>,
) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let grace = app.limits.shutdown_grace;
    eprintln!("shutting down: no new connections; requests in flight have {:.0} s (a second signal cancels them now)", grace.as_secs_f64());
    let _ = stop_accepting.send(());
    tokio::select! {
        _ = tokio::time::sleep(grace) => eprintln!("shutdown grace over: cancelling the requests in flight"),
        _ = term.recv() => eprintln!("second signal: cancelling the requests in flight"),
        _ = int.recv() => eprintln!("second signal: cancelling the requests in flight"),
    }
    app.shutting_down.store(true, Ordering::SeqCst);
    app.cancel_all.send_replace(true);
}
