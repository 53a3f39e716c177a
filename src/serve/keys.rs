//! API keys and their credits in one SQLite file. Only a key's SHA-256 is stored: a leaked
//! database does not leak usable keys, and a key is shown once, when it is made. One credit buys
//! one image; credits are taken before generating (atomically, so two requests cannot spend the
//! same credit) and given back if generation fails.
use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    key_sha256 TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    credits    INTEGER NOT NULL CHECK (credits >= 0),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
CREATE TABLE IF NOT EXISTS usage (
    id         INTEGER PRIMARY KEY,
    key_sha256 TEXT NOT NULL REFERENCES api_keys(key_sha256),
    at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    images     INTEGER NOT NULL,
    status     INTEGER NOT NULL
);
";

/// One key's row, as `sdkd keys list` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyInfo {
    pub name: String,
    pub credits: i64,
    pub created_at: String,
    /// Images served with this key so far.
    pub images: i64,
}

/// What spending credits found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// Taken; the balance left.
    Taken { left: i64 },
    /// The key exists but holds fewer credits than asked; its balance.
    Short { has: i64 },
    UnknownKey,
}

pub struct KeyStore {
    db: Connection,
}

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A new key: `sdkd_` and 48 hex digits from the OS's random source (192 bits).
fn new_key() -> Result<String> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for a new API key")?;
    Ok(format!("sdkd_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

impl KeyStore {
    /// Opens the key database at `path`, creating it when absent (only `sdkd keys add` does).
    pub fn create_or_open(path: &Path) -> Result<KeyStore> {
        let db = Connection::open(path).with_context(|| format!("opening key database {}", path.display()))?;
        KeyStore::init(db, path)
    }

    /// Opens the existing key database at `path`; a missing one is an error (a typo in `--db`
    /// must not start an empty database).
    pub fn open(path: &Path) -> Result<KeyStore> {
        if !path.is_file() {
            bail!(
                "key database {} does not exist: make it with `sdkd keys add --db {} --name <name>`",
                path.display(),
                path.display()
            );
        }
        let db = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_context(|| format!("opening key database {}", path.display()))?;
        KeyStore::init(db, path)
    }

    fn init(db: Connection, path: &Path) -> Result<KeyStore> {
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(SCHEMA).with_context(|| format!("key database {}: creating its tables", path.display()))?;
        Ok(KeyStore { db })
    }

    /// Makes a key named `name` holding `credits`; returns the key (the only time it is seen).
    pub fn add(&self, name: &str, credits: i64) -> Result<String> {
        if name.trim().is_empty() {
            bail!("--name: give the key a name (who or what it is for)");
        }
        if credits < 0 {
            bail!("--credits {credits}: must be >= 0");
        }
        let key = new_key()?;
        let added = self.db.execute(
            "INSERT INTO api_keys (key_sha256, name, credits) VALUES (?1, ?2, ?3) ON CONFLICT(name) DO NOTHING",
            params![sha256_hex(&key), name, credits],
        )?;
        if added == 0 {
            bail!("--name {name:?}: a key with that name exists already");
        }
        Ok(key)
    }

    /// Adds `delta` credits (negative takes them away, down to 0 at most) to the key named `name`;
    /// returns the new balance. A sum past `i64::MAX` is refused and the balance left as it was
    /// (SQLite would silently store it as a REAL, which no later read accepts).
    pub fn credit(&self, name: &str, delta: i64) -> Result<i64> {
        // IMMEDIATE: the read and the write are one step for concurrent spenders.
        let tx = Transaction::new_unchecked(&self.db, TransactionBehavior::Immediate)?;
        let has: Option<i64> =
            tx.query_row("SELECT credits FROM api_keys WHERE name = ?1", [name], |r| r.get(0)).optional()?;
        let has = has.with_context(|| format!("--name {name:?}: no such key"))?;
        let Some(sum) = has.checked_add(delta) else {
            bail!("--add {delta}: key {name:?} holds {has} credits, and a balance cannot exceed {}; nothing changed", i64::MAX);
        };
        let balance = sum.max(0);
        tx.execute("UPDATE api_keys SET credits = ?1 WHERE name = ?2", params![balance, name])?;
        tx.commit()?;
        Ok(balance)
    }

    pub fn list(&self) -> Result<Vec<KeyInfo>> {
        let mut stmt = self.db.prepare(
            "SELECT k.name, k.credits, k.created_at, COALESCE(SUM(u.images) FILTER (WHERE u.status = 200), 0)
             FROM api_keys k LEFT JOIN usage u ON u.key_sha256 = k.key_sha256
             GROUP BY k.key_sha256 ORDER BY k.created_at, k.name",
        )?;
        let rows = stmt.query_map([], |r| Ok(KeyInfo { name: r.get(0)?, credits: r.get(1)?, created_at: r.get(2)?, images: r.get(3)? }))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The balance of `key`, or None when no such key exists.
    pub fn credits(&self, key: &str) -> Result<Option<i64>> {
        Ok(self
            .db
            .query_row("SELECT credits FROM api_keys WHERE key_sha256 = ?1", [sha256_hex(key)], |r| r.get(0))
            .optional()?)
    }

    /// Takes `n` credits from `key` if it holds that many, in one statement.
    pub fn spend(&self, key: &str, n: i64) -> Result<Spend> {
        let hash = sha256_hex(key);
        let left: Option<i64> = self
            .db
            .query_row(
                "UPDATE api_keys SET credits = credits - ?1 WHERE key_sha256 = ?2 AND credits >= ?1 RETURNING credits",
                params![n, hash],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match (left, self.credits(key)?) {
            (Some(left), _) => Spend::Taken { left },
            (None, Some(has)) => Spend::Short { has },
            (None, None) => Spend::UnknownKey,
        })
    }

    /// Gives back `n` credits taken by `spend` for a request that failed.
    pub fn refund(&self, key: &str, n: i64) -> Result<()> {
        self.db.execute("UPDATE api_keys SET credits = credits + ?1 WHERE key_sha256 = ?2", params![n, sha256_hex(key)])?;
        Ok(())
    }

    /// Records one generation request of `key` (its images and HTTP status).
    pub fn record(&self, key: &str, images: i64, status: u16) -> Result<()> {
        self.db.execute(
            "INSERT INTO usage (key_sha256, images, status) VALUES (?1, ?2, ?3)",
            params![sha256_hex(key), images, status],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spend_refund_and_list() {
        let dir = tempfile::tempdir().unwrap();
        assert!(format!("{:#}", KeyStore::open(&dir.path().join("keys.sqlite")).err().unwrap()).contains("does not exist"));
        assert!(!dir.path().join("keys.sqlite").exists(), "open must not create a database");
        let store = KeyStore::create_or_open(&dir.path().join("keys.sqlite")).unwrap();
        let key = store.add("alice", 3).unwrap();
        assert!(key.starts_with("sdkd_") && key.len() == 5 + 48, "{key}");
        assert_ne!(store.add("bob", 0).unwrap(), key);
        assert!(store.add("alice", 1).unwrap_err().to_string().contains("alice"));
        assert!(store.add("carol", -1).is_err());

        assert_eq!(store.spend(&key, 2).unwrap(), Spend::Taken { left: 1 });
        store.record(&key, 2, 200).unwrap();
        assert_eq!(store.spend(&key, 2).unwrap(), Spend::Short { has: 1 });
        assert_eq!(store.spend("sdkd_nope", 1).unwrap(), Spend::UnknownKey);
        assert_eq!(store.spend(&key, 1).unwrap(), Spend::Taken { left: 0 });
        store.refund(&key, 1).unwrap();
        assert_eq!(store.credits(&key).unwrap(), Some(1));
        assert_eq!(store.credit("alice", 10).unwrap(), 11);
        assert_eq!(store.credit("alice", -100).unwrap(), 0);
        assert!(store.credit("nobody", 1).is_err());
        assert_eq!(store.credit("alice", i64::MAX).unwrap(), i64::MAX);
        assert!(format!("{:#}", store.credit("alice", 1).unwrap_err()).contains("nothing changed"));
        assert_eq!(store.credit("alice", i64::MIN).unwrap(), 0);

        // the key itself is not in the file, only its hash
        drop(store);
        let raw = std::fs::read(dir.path().join("keys.sqlite")).unwrap();
        assert!(!raw.windows(key.len()).any(|w| w == key.as_bytes()));
        let store = KeyStore::open(&dir.path().join("keys.sqlite")).unwrap();
        let list = store.list().unwrap();
        assert_eq!(list.iter().map(|k| (k.name.as_str(), k.credits, k.images)).collect::<Vec<_>>(), vec![("alice", 0, 2), ("bob", 0, 0)]);
    }
}
