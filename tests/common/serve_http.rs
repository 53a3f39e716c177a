//! A `sdkd serve` process and a plain HTTP/1.1 client for it, shared by tests/serve.rs and
//! tests/serve_faults.rs. Loopback only; every read has a timeout.
use super::sdkd;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server process and the file its stderr (the log) goes to; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
    log: PathBuf,
}

impl Server {
    /// Starts `sdkd serve` on an ephemeral loopback port and waits for the address it prints.
    pub fn start(model: &Path, db: &Path, log: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sdkd"))
            .args(["serve", "--model", &model.display().to_string(), "--db", &db.display().to_string()])
            .args(["--listen", "127.0.0.1:0", "--device", "cpu"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("starting sdkd serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}; log:\n{}", std::fs::read_to_string(log).unwrap_or_default()))
            .to_string();
        Server { child, addr, log: log.to_path_buf() }
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.wait().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `limit` for the process to exit; how long it took.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<(Duration, std::process::ExitStatus)> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some((t.elapsed(), status));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Waits up to `limit` for `needle` in the log.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.log().contains(needle) {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Answer {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).unwrap_or_else(|| panic!("no {name} in {:?}", self.headers))
    }

    pub fn num(&self, name: &str) -> i64 {
        self.header(name).parse().unwrap()
    }

    pub fn credits(&self) -> i64 {
        self.num("x-remaining-credits")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The JSON answer's `error`, or "" when there is none.
    pub fn error(&self) -> String {
        let v: Value = serde_json::from_slice(&self.body).unwrap_or_default();
        v["error"].as_str().unwrap_or_default().to_string()
    }
}

/// Sends one request (`Connection: close`) and returns the open stream to read the answer from.
pub fn send(addr: &str, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        head += "Content-Type: application/json\r\n";
    }
    if let Some(k) = key {
        head += &format!("x-api-key: {k}\r\n");
    }
    stream.write_all(format!("{head}\r\n{body}").as_bytes())?;
    Ok(stream)
}

/// Reads a whole answer (the server closes the connection after it).
pub fn receive(mut stream: TcpStream) -> std::io::Result<Answer> {
    let mut raw = vec![];
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no end of headers in {} bytes", raw.len())))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    Ok(Answer { status, headers, body: raw[split + 4..].to_vec() })
}

pub fn http(addr: &str, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> Answer {
    receive(send(addr, method, path, key, body).unwrap()).unwrap()
}

/// `sdkd keys add`: the new key.
pub fn add_key(db: &Path, name: &str, credits: i64) -> String {
    let out = sdkd(&["keys", "add", "--db", &db.display().to_string(), "--name", name, "--credits", &credits.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
