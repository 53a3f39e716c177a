//! TensorBoard event files: scalars and PNG images, readable by TensorBoard itself.
//!
//! Written by hand rather than with the `tensorboard-rs` crate: that crate panics on I/O errors
//! (its writer thread `expect`s every write), swaps width and height of non-square images, and
//! pulls in image 0.23 and protobuf 2. The format is small: a TFRecord stream (length, masked
//! CRC32C of the length, payload, masked CRC32C of the payload) of `Event` protobufs, of which we
//! need five fields, encoded below by hand.
//!
//! A resumed run opens a new file with a `SessionLog.START` event at the resume step, so
//! TensorBoard drops what the interrupted run logged after its last checkpoint instead of drawing
//! two overlapping curves.
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// An open event file (`events.out.tfevents.<time>.<host>.<pid>.<n>`) in a log folder.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates the folder and a new event file in it. `resume_step`: the step a resumed run
    /// continues from (TensorBoard then discards older events at or after it).
    pub fn create(dir: &Path, resume_step: Option<u64>) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating TensorBoard folder {}", dir.display()))?;
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let host = hostname();
        let pid = std::process::id();
        // A fresh suffix per file: two writers of one process in one second (a resume inside a
        // test) must not share a name, and TensorBoard reads files in name order.
        let mut n = 0;
        let (path, file) = loop {
            let path = dir.join(format!("events.out.tfevents.{secs:010}.{host}.{pid}.{n}"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        };
        let mut w = EventWriter { path, out: BufWriter::new(file) };
        let mut ev = event_header(wall_time(), 0);
        put_bytes(&mut ev, 3, b"brain.Event:2"); // file_version: 2 = SessionLog-based purging
        w.write_record(&ev)?;
        if let Some(step) = resume_step {
            let mut session_log = vec![];
            put_varint_field(&mut session_log, 1, 1); // status = START
            let mut ev = event_header(wall_time(), step as i64);
            put_bytes(&mut ev, 7, &session_log); // session_log
            w.write_record(&ev)?;
        }
        w.flush()?;
        Ok(w)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn add_scalar(&mut self, tag: &str, value: f32, step: u64) -> Result<()> {
        self.add_scalars(&[(tag, value)], step)
    }

    /// Several scalars of one step in one event (loss/total, loss/task, lr, ...).
    pub fn add_scalars(&mut self, values: &[(&str, f32)], step: u64) -> Result<()> {
        let mut summary = vec![];
        for (tag, v) in values {
            let mut value = vec![];
            put_bytes(&mut value, 1, tag.as_bytes());
            put_key(&mut value, 2, WIRE_FIXED32);
            value.extend_from_slice(&v.to_le_bytes());
            put_bytes(&mut summary, 1, &value);
        }
        self.write_summary(&summary, step)
    }

    /// An already encoded PNG (or JPEG) image.
    pub fn add_image_png(&mut self, tag: &str, png: &[u8], width: u32, height: u32, step: u64) -> Result<()> {
        let mut image = vec![];
        put_varint_field(&mut image, 1, height as u64);
        put_varint_field(&mut image, 2, width as u64);
        put_varint_field(&mut image, 3, 3); // colorspace: RGB
        put_bytes(&mut image, 4, png);
        let mut value = vec![];
        put_bytes(&mut value, 1, tag.as_bytes());
        put_bytes(&mut value, 4, &image);
        let mut summary = vec![];
        put_bytes(&mut summary, 1, &value);
        self.write_summary(&summary, step)
    }

    /// An RGB8 image, row-major (height, width, 3), encoded to PNG here.
    pub fn add_image_rgb(&mut self, tag: &str, rgb: &[u8], width: u32, height: u32, step: u64) -> Result<()> {
        let png = encode_png(rgb, width, height)?;
        self.add_image_png(tag, &png, width, height, step)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().with_context(|| format!("writing {}", self.path.display()))
    }

    fn write_summary(&mut self, summary: &[u8], step: u64) -> Result<()> {
        let mut ev = event_header(wall_time(), step as i64);
        put_bytes(&mut ev, 5, summary);
        self.write_record(&ev)?;
        // Flushed per event: TensorBoard shows a live run, and a killed run loses nothing logged.
        self.flush()
    }

    fn write_record(&mut self, payload: &[u8]) -> Result<()> {
        let len = (payload.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(payload.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        rec.extend_from_slice(payload);
        rec.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
        self.out.write_all(&rec).with_context(|| format!("writing {}", self.path.display()))
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// PNG bytes of an RGB8 (height, width, 3) image.
pub fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    if rgb.len() != width as usize * height as usize * 3 {
        bail!("image of {width}x{height} RGB needs {} bytes, got {}", width as usize * height as usize * 3, rgb.len());
    }
    let mut png = vec![];
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
        .context("encoding PNG")?;
    Ok(png)
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let h: String = h.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect();
    if h.is_empty() {
        "localhost".to_string()
    } else {
        h
    }
}

// Protobuf wire format: a key is (field << 3 | wire type), varints are little-endian base-128.
const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(buf, ((field as u64) << 3) | wire as u64);
}

fn put_varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    put_key(buf, field, WIRE_VARINT);
    put_varint(buf, v);
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, WIRE_LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64) }`; the caller appends the payload field.
fn event_header(wall_time: f64, step: i64) -> Vec<u8> {
    let mut ev = vec![];
    put_key(&mut ev, 1, WIRE_FIXED64);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    put_varint_field(&mut ev, 2, step as u64); // int64: negative steps would be 10-byte varints
    ev
}

/// CRC-32C (Castagnoli), as TFRecord uses.
fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    const TABLE: [u32; 256] = table();
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: rotate right by 15 and add a constant.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA); // RFC 3720 B.4
        assert_eq!(masked_crc32c(b"123456789"), 0xE3069283u32.rotate_right(15).wrapping_add(0xa282ead8));
    }

    #[test]
    fn varints_and_keys() {
        let mut b = vec![];
        put_varint(&mut b, 300);
        assert_eq!(b, [0xAC, 0x02]);
        let mut b = vec![];
        put_bytes(&mut b, 1, b"hi");
        assert_eq!(b, [0x0A, 2, b'h', b'i']);
        let mut b = vec![];
        put_key(&mut b, 2, WIRE_FIXED32);
        assert_eq!(b, [0x15]);
    }

    #[test]
    fn records_are_framed_and_files_unique() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = EventWriter::create(dir.path(), None).unwrap();
        let b = EventWriter::create(dir.path(), Some(3)).unwrap();
        assert_ne!(a.path(), b.path());
        a.add_scalar("x", 1.5, 7).unwrap();
        let bytes = std::fs::read(a.path()).unwrap();
        // Walk the records: every length and payload checksum must verify.
        let mut pos = 0;
        let mut n = 0;
        while pos < bytes.len() {
            let len = u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap()) as usize;
            assert_eq!(
                u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap()),
                masked_crc32c(&bytes[pos..pos + 8])
            );
            let payload = &bytes[pos + 12..pos + 12 + len];
            let crc = u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(payload));
            pos += 16 + len;
            n += 1;
        }
        assert_eq!((pos, n), (bytes.len(), 2));
        assert!(encode_png(&[0; 5], 1, 2).is_err());
    }
}
