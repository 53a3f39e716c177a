//! `sdkd serve`: a text-to-image HTTP API in the style of Segmind's SD-Small/SD-Tiny API (docs/serve.md).
//!
//! `POST /v1/txt2img` with the key in `x-api-key` and a JSON body (`request.rs`); one credit per
//! image (`keys.rs`). Every answer carries `x-remaining-credits` (0 without a valid key). Status
//! codes: 200 image(s), 400 a bad request body (the message names the field), 401 no or an
//! unknown key, 404 unknown URL, 405 method not allowed, 406 not enough credits, 500 the
//! generation failed (its credits are given back). Errors are `{"error": "<message>"}`.
//!
//! The model runs one request at a time on a blocking thread (one pipeline, and LibTorch already
//! uses every core for one image); the HTTP side keeps answering meanwhile.
pub mod keys;
pub mod request;

use crate::grid::grid;
use crate::pipeline::{GenerateRequest, TextToImage};
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
use keys::{KeyStore, Spend};
use request::Txt2Img;
use serde_json::json;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

pub const KEY_HEADER: &str = "x-api-key";
pub const CREDITS_HEADER: &str = "x-remaining-credits";

/// What the handlers share.
pub struct App {
    pipeline: Mutex<TextToImage>,
    keys: Mutex<KeyStore>,
    /// What the PNG text chunks and `/v1/health` call the model.
    model: String,
    /// The VAE's downscale factor: image sides must be multiples of it.
    vae_factor: i64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a panic in one request must not take the server down with a poisoned lock
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl App {
    pub fn new(pipeline: TextToImage, keys: KeyStore, model: String) -> Arc<App> {
        let vae_factor = pipeline.vae.model.config.downscale_factor();
        Arc::new(App { pipeline: Mutex::new(pipeline), keys: Mutex::new(keys), model, vae_factor })
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
        .fallback(|| async { error(StatusCode::NOT_FOUND, "unknown URL: the API is POST /v1/txt2img") })
        .layer(middleware::from_fn_with_state(app.clone(), remaining_credits))
        .with_state(app)
}

/// Adds `x-remaining-credits` to every answer and logs the request.
async fn remaining_credits(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let key = api_key(req.headers());
    let mut response = next.run(req).await;
    let credits = key.and_then(|k| lock(&app.keys).credits(&k).ok().flatten()).unwrap_or(0);
    response.headers_mut().insert(CREDITS_HEADER, HeaderValue::from(credits));
    eprintln!("{method} {path} -> {} in {:.2}s", response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

async fn health(State(app): State<Arc<App>>) -> Response {
    Json(json!({ "status": "ok", "model": app.model })).into_response()
}

async fn txt2img(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(key) = api_key(&headers) else {
        return error(StatusCode::UNAUTHORIZED, format!("authentication failed: send your API key in the {KEY_HEADER} header"));
    };
    match lock(&app.keys).credits(&key) {
        Ok(Some(_)) => {}
        Ok(None) => return error(StatusCode::UNAUTHORIZED, "authentication failed: unknown API key"),
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
    let n = req.samples as i64;
    let spent = lock(&app.keys).spend(&key, n);
    match spent {
        Ok(Spend::Taken { .. }) => {}
        Ok(Spend::Short { has }) => {
            return error(StatusCode::NOT_ACCEPTABLE, format!("not enough credits: {n} image(s) cost {n}, the key has {has}"));
        }
        Ok(Spend::UnknownKey) => return error(StatusCode::UNAUTHORIZED, "authentication failed: unknown API key"),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("key database: {e:#}")),
    }

    let worker = app.clone();
    let job = req.clone();
    let generated = tokio::task::spawn_blocking(move || {
        let pipeline = lock(&worker.pipeline);
        pipeline.generate(&job).map(|images| (images, pipeline.parts().truncated_prompts(&job)))
    })
    .await;
    let result = match generated {
        Ok(Ok((images, truncated))) => encode(&app, &api, &req, images, &truncated),
        Ok(Err(e)) => Err(e),
        Err(join) => Err(anyhow::anyhow!("the generation thread failed: {join}")),
    };
    let keys = lock(&app.keys);
    match result {
        Ok(response) => {
            let _ = keys.record(&key, n, 200);
            response
        }
        Err(e) => {
            let _ = keys.refund(&key, n);
            let _ = keys.record(&key, n, 500);
            error(StatusCode::INTERNAL_SERVER_ERROR, format!("generation failed (credits given back): {e:#}"))
        }
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
/// bound address: port 0 picks a free one) to stdout first.
pub fn serve(app: Arc<App>, listen: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("--listen {listen}: cannot listen there"))?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr} (POST /v1/txt2img)");
        use std::io::Write;
        std::io::stdout().flush()?;
        axum::serve(listener, router(app)).with_graceful_shutdown(shutdown_signal()).await.context("serving")
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("shutting down: finishing the requests in flight");
}
