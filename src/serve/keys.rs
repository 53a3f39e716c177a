//! API keys and their credits in one SQLite file. Only a key's SHA-256 is stored: a leaked
//! database does not leak usable keys, and a key is shown once, when it is made.
//!
//! The ledger: every generation request is a row of `generations`, made `pending` in the same
//! transaction that takes its credits, and later turned `served` (the images delivered) or
//! `refunded` (its credits back) in one transaction each, only from `pending`, so that nothing is
//! refunded twice. A row carries the id of the server instance that took it; a server that starts
//! refunds the pending rows of instances that are no longer running (a `kill -9`, a power cut), so
//! a crash at any instant loses no credit.
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
CREATE TABLE IF NOT EXISTS generations (
    id          INTEGER PRIMARY KEY,
    key_sha256  TEXT NOT NULL REFERENCES api_keys(key_sha256),
    credits     INTEGER NOT NULL CHECK (credits >= 0),
    images      INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'served', 'refunded')),
    instance    TEXT NOT NULL,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at TEXT,
    status      INTEGER,
    cause       TEXT
);
CREATE INDEX IF NOT EXISTS generations_pending ON generations(instance) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS instances (
    id         TEXT PRIMARY KEY,
    pid        INTEGER NOT NULL,
    -- the process's start time in clock ticks since boot (/proc/<pid>/stat): a reused pid differs
    start_tick INTEGER NOT NULL,
    started_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
CREATE TABLE IF NOT EXISTS revoked_keys (
    key_sha256 TEXT PRIMARY KEY REFERENCES api_keys(key_sha256),
    at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
";

/// sdkd's SQLite `application_id` ("sdkd" in ASCII), set in every key database it makes: an
/// existing file is written only when it carries it, or (made before sdkd set it) holds sdkd's
/// tables and no others, or no tables at all.
const APPLICATION_ID: i64 = 0x7364_6b64;
const TABLES: [&str; 5] = ["api_keys", "usage", "generations", "instances", "revoked_keys"];

/// One key's row, as `sdkd keys list` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyInfo {
    pub name: String,
    pub credits: i64,
    pub created_at: String,
    /// Images served with this key so far.
    pub images: i64,
    pub revoked: bool,
}

/// What asking for credits found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Taken and held by the pending generation `id`; the balance left.
    Held { id: i64, left: i64 },
    /// The key exists but holds fewer credits than asked; its balance.
    Short { has: i64 },
    UnknownKey,
    Revoked,
}

/// A key as the server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active { credits: i64 },
    Revoked,
    Unknown,
}

/// One row of `sdkd keys usage`.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub id: i64,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub state: String,
    pub credits: i64,
    pub images: i64,
    pub status: Option<i64>,
    pub cause: Option<String>,
}

/// Pending generations of a dead instance that a starting server gave back.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    pub instance: String,
    pub generations: i64,
    pub credits: i64,
}

pub struct KeyStore {
    db: Connection,
}

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A new key: `sdkd_` and 48 hex digits from the OS's random source (192 bits).
fn new_key() -> Result<String> {
    Ok(format!("sdkd_{}", random_hex(24).context("a new API key")?))
}

/// Field 22 of /proc/<pid>/stat, the process's start time; None when no such process runs.
fn start_tick(pid: u32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name (field 2) is in parentheses and may hold spaces: count after the last ')'
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
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
        // SQLite takes an empty file for an empty database and would write its tables there.
        if path.metadata().is_ok_and(|m| m.len() == 0) {
            bail!("--db {}: the file is empty, not an sdkd key database: make one with `sdkd keys add`", path.display());
        }
        let db = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_context(|| format!("opening key database {}", path.display()))?;
        KeyStore::init(db, path)
    }

    fn init(db: Connection, path: &Path) -> Result<KeyStore> {
        let p = path.display();
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        let id: i64 = db
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .with_context(|| format!("--db {p}: not an SQLite database (an sdkd key database is one)"))?;
        if id != APPLICATION_ID {
            if id != 0 {
                bail!("--db {p} is another application's SQLite database (application_id {id:#x}), not an sdkd key database: sdkd will not write into it; give --db a new file");
            }
            let mut query = db.prepare("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' ORDER BY name")?;
            let tables: Vec<String> = query.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            let others: Vec<String> = tables.iter().filter(|t| !TABLES.contains(&t.as_str())).cloned().collect();
            if !others.is_empty() || (!tables.is_empty() && !tables.iter().any(|t| t == "api_keys")) {
                bail!(
                    "--db {p} is an SQLite database of something else (its tables: {}), not an sdkd key database: sdkd will not write into it; give --db a new file",
                    crate::fs_safe::list_some(&tables)
                );
            }
        }
        db.execute_batch(SCHEMA).with_context(|| format!("key database {p}: creating its tables"))?;
        if id != APPLICATION_ID {
            db.execute_batch(&format!("PRAGMA application_id = {APPLICATION_ID}")).with_context(|| format!("key database {p}: marking it as sdkd's"))?;
        }
        Ok(KeyStore { db })
    }

    /// Whether the key named `name` is revoked.
    pub fn is_revoked(&self, name: &str) -> Result<bool> {
        let hash = self.hash_of(name)?;
        Ok(self.db.query_row("SELECT COUNT(*) FROM revoked_keys WHERE key_sha256 = ?1", [hash], |r| r.get::<_, i64>(0))? > 0)
    }

    fn immediate(&self) -> Result<Transaction<'_>> {
        // IMMEDIATE: the reads and writes are one step for concurrent writers.
        Ok(Transaction::new_unchecked(&self.db, TransactionBehavior::Immediate)?)
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

    fn hash_of(&self, name: &str) -> Result<String> {
        let hash: Option<String> =
            self.db.query_row("SELECT key_sha256 FROM api_keys WHERE name = ?1", [name], |r| r.get(0)).optional()?;
        hash.with_context(|| format!("--name {name:?}: no such key"))
    }

    /// Adds `delta` credits (negative takes them away, down to 0 at most) to the key named `name`;
    /// returns the new balance. A sum past `i64::MAX` is refused and the balance left as it was
    /// (SQLite would silently store it as a REAL, which no later read accepts).
    pub fn credit(&self, name: &str, delta: i64) -> Result<i64> {
        let tx = self.immediate()?;
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

    /// Revokes the key named `name`: the server answers it 401 from now on; its rows stay.
    /// Returns false when it was revoked already.
    pub fn revoke(&self, name: &str) -> Result<bool> {
        let hash = self.hash_of(name)?;
        Ok(self.db.execute("INSERT INTO revoked_keys (key_sha256) VALUES (?1) ON CONFLICT DO NOTHING", [hash])? == 1)
    }

    pub fn list(&self) -> Result<Vec<KeyInfo>> {
        // images: the served generations, and the usage rows of databases from before the ledger
        let mut stmt = self.db.prepare(
            "SELECT k.name, k.credits, k.created_at,
                    COALESCE((SELECT SUM(images) FROM usage u WHERE u.key_sha256 = k.key_sha256 AND u.status = 200), 0)
                  + COALESCE((SELECT SUM(images) FROM generations g WHERE g.key_sha256 = k.key_sha256 AND g.state = 'served'), 0),
                    EXISTS (SELECT 1 FROM revoked_keys r WHERE r.key_sha256 = k.key_sha256)
             FROM api_keys k ORDER BY k.created_at, k.name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(KeyInfo { name: r.get(0)?, credits: r.get(1)?, created_at: r.get(2)?, images: r.get(3)?, revoked: r.get(4)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The generation rows of the key named `name`, oldest first.
    pub fn usage(&self, name: &str) -> Result<Vec<Generation>> {
        let hash = self.hash_of(name)?;
        let mut stmt = self.db.prepare(
            "SELECT id, created_at, finished_at, state, credits, images, status, cause FROM generations
             WHERE key_sha256 = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([hash], |r| {
            Ok(Generation {
                id: r.get(0)?,
                created_at: r.get(1)?,
                finished_at: r.get(2)?,
                state: r.get(3)?,
                credits: r.get(4)?,
                images: r.get(5)?,
                status: r.get(6)?,
                cause: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether `key` exists, is revoked, and its balance.
    pub fn key_state(&self, key: &str) -> Result<KeyState> {
        Ok(match balance_and_revoked(&self.db, &sha256_hex(key))? {
            None => KeyState::Unknown,
            Some((_, true)) => KeyState::Revoked,
            Some((credits, false)) => KeyState::Active { credits },
        })
    }

    /// The balance of `key` (revoked or not), or None when no such key exists.
    pub fn credits(&self, key: &str) -> Result<Option<i64>> {
        Ok(self
            .db
            .query_row("SELECT credits FROM api_keys WHERE key_sha256 = ?1", [sha256_hex(key)], |r| r.get(0))
            .optional()?)
    }

    /// Registers this process as server instance `instance` and refunds the pending generations
    /// of every registered instance that no longer runs; returns what it refunded.
    pub fn start_instance(&self, instance: &str) -> Result<Vec<Recovered>> {
        let pid = std::process::id();
        let tick = start_tick(pid).context("reading this process's start time from /proc/self/stat")?;
        let tx = self.immediate()?;
        let others: Vec<(String, u32, i64)> = {
            let mut stmt = tx.prepare("SELECT id, pid, start_tick FROM instances")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut recovered = vec![];
        for (id, other_pid, other_tick) in others {
            if start_tick(other_pid) == Some(other_tick) {
                continue; // still running: its requests are its own
            }
            let (generations, credits) = refund_pending(&tx, &id, "the server instance stopped before finishing it")?;
            tx.execute("DELETE FROM instances WHERE id = ?1", [&id])?;
            if generations > 0 {
                recovered.push(Recovered { instance: id, generations, credits });
            }
        }
        // rows of instances that were never registered (a database from an older sdkd) are dead too
        let orphans: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT DISTINCT instance FROM generations WHERE state = 'pending' AND instance NOT IN (SELECT id FROM instances)",
            )?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for id in orphans {
            let (generations, credits) = refund_pending(&tx, &id, "the server instance stopped before finishing it")?;
            recovered.push(Recovered { instance: id, generations, credits });
        }
        tx.execute("INSERT INTO instances (id, pid, start_tick) VALUES (?1, ?2, ?3)", params![instance, pid, tick])?;
        tx.commit()?;
        Ok(recovered)
    }

    /// Unregisters `instance` at a clean exit (its rows are all settled by then).
    /// Refunds every pending generation of `instance` (a server leaving a step it cannot wait
    /// for); returns (generations, credits).
    pub fn refund_instance(&self, instance: &str, cause: &str) -> Result<(i64, i64)> {
        let tx = self.immediate()?;
        let refunded = refund_pending(&tx, instance, cause)?;
        tx.commit()?;
        Ok(refunded)
    }

    pub fn stop_instance(&self, instance: &str) -> Result<()> {
        self.db.execute("DELETE FROM instances WHERE id = ?1", [instance])?;
        Ok(())
    }

    /// Takes `credits` from `key` for `images` images, if it holds that many, and records the
    /// pending generation of `instance` holding them, in one transaction.
    pub fn hold(&self, key: &str, credits: i64, images: i64, instance: &str) -> Result<Hold> {
        let hash = sha256_hex(key);
        let tx = self.immediate()?;
        let has = match balance_and_revoked(&tx, &hash)? {
            None => return Ok(Hold::UnknownKey),
            Some((_, true)) => return Ok(Hold::Revoked),
            Some((has, false)) => has,
        };
        if has < credits {
            return Ok(Hold::Short { has });
        }
        tx.execute("UPDATE api_keys SET credits = credits - ?1 WHERE key_sha256 = ?2", params![credits, hash])?;
        tx.execute(
            "INSERT INTO generations (key_sha256, credits, images, state, instance) VALUES (?1, ?2, ?3, 'pending', ?4)",
            params![hash, credits, images, instance],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Hold::Held { id, left: has - credits })
    }

    /// Marks generation `id` served (its images delivered, its credits kept). False when it was
    /// no longer pending.
    pub fn served(&self, id: i64) -> Result<bool> {
        let changed = self.db.execute(
            "UPDATE generations SET state = 'served', status = 200, finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             WHERE id = ?1 AND state = 'pending'",
            [id],
        )?;
        Ok(changed == 1)
    }

    /// Gives the credits of pending generation `id` back and marks it refunded with the HTTP
    /// `status` answered and its `cause`, in one transaction. False when it was no longer pending
    /// (nothing is refunded twice).
    pub fn refund(&self, id: i64, status: u16, cause: &str) -> Result<bool> {
        let tx = self.immediate()?;
        let refunded = settle_refund(&tx, id, Some(status), cause)?;
        tx.commit()?;
        Ok(refunded.is_some())
    }
}

/// (balance, revoked) of the key whose SHA-256 is `hash`, or None when there is no such key.
fn balance_and_revoked(db: &Connection, hash: &str) -> Result<Option<(i64, bool)>> {
    Ok(db
        .query_row(
            "SELECT credits, EXISTS (SELECT 1 FROM revoked_keys r WHERE r.key_sha256 = k.key_sha256)
             FROM api_keys k WHERE key_sha256 = ?1",
            [hash],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

/// Refunds pending generation `id` inside `tx`; returns its credits, or None when not pending.
fn settle_refund(tx: &Transaction<'_>, id: i64, status: Option<u16>, cause: &str) -> Result<Option<i64>> {
    let row: Option<(String, i64)> = tx
        .query_row("SELECT key_sha256, credits FROM generations WHERE id = ?1 AND state = 'pending'", [id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((hash, credits)) = row else { return Ok(None) };
    tx.execute(
        "UPDATE generations SET state = 'refunded', status = ?2, cause = ?3, finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
         WHERE id = ?1",
        params![id, status, cause],
    )?;
    // held credits came out of this balance, so adding them back cannot pass i64::MAX unless a
    // top-up came in meanwhile; then the balance is capped rather than the refund failing
    tx.execute(
        "UPDATE api_keys SET credits = CASE WHEN credits > 9223372036854775807 - ?1 THEN 9223372036854775807 ELSE credits + ?1 END
         WHERE key_sha256 = ?2",
        params![credits, hash],
    )?;
    Ok(Some(credits))
}

/// Refunds every pending generation of `instance` inside `tx`: (generations, credits).
fn refund_pending(tx: &Transaction<'_>, instance: &str, cause: &str) -> Result<(i64, i64)> {
    let ids: Vec<i64> = {
        let mut stmt = tx.prepare("SELECT id FROM generations WHERE instance = ?1 AND state = 'pending'")?;
        let rows = stmt.query_map([instance], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let (mut generations, mut credits) = (0, 0);
    for id in ids {
        if let Some(c) = settle_refund(tx, id, None, cause)? {
            generations += 1;
            credits += c;
        }
    }
    Ok((generations, credits))
}

/// A fresh id for one server process.
pub fn new_instance_id() -> Result<String> {
    random_hex(8).context("a server instance id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_holds_serves_refunds_once_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        assert!(format!("{:#}", KeyStore::open(&dir.path().join("keys.sqlite")).err().unwrap()).contains("does not exist"));
        assert!(!dir.path().join("keys.sqlite").exists(), "open must not create a database");
        let store = KeyStore::create_or_open(&dir.path().join("keys.sqlite")).unwrap();
        let key = store.add("alice", 3).unwrap();
        assert!(key.starts_with("sdkd_") && key.len() == 5 + 48, "{key}");
        assert_ne!(store.add("bob", 0).unwrap(), key);
        assert!(store.add("alice", 1).unwrap_err().to_string().contains("alice"));
        assert!(store.add("carol", -1).is_err());

        let me = new_instance_id().unwrap();
        assert_eq!(store.start_instance(&me).unwrap(), vec![]);
        let Hold::Held { id, left: 1 } = store.hold(&key, 2, 2, &me).unwrap() else { panic!("not held") };
        assert!(store.served(id).unwrap() && !store.served(id).unwrap() && !store.refund(id, 500, "x").unwrap());
        assert_eq!(store.hold(&key, 2, 1, &me).unwrap(), Hold::Short { has: 1 });
        assert_eq!(store.hold("sdkd_nope", 1, 1, &me).unwrap(), Hold::UnknownKey);
        let Hold::Held { id, left: 0 } = store.hold(&key, 1, 1, &me).unwrap() else { panic!("not held") };
        assert!(store.refund(id, 500, "failed").unwrap() && !store.refund(id, 500, "again").unwrap());
        assert_eq!(store.credits(&key).unwrap(), Some(1));
        // a pending row of an instance that no longer runs is refunded once, at the next start
        let Hold::Held { id: lost, .. } = store.hold(&key, 1, 1, "dead-instance").unwrap() else { panic!("not held") };
        assert_eq!(store.credits(&key).unwrap(), Some(0));
        let recovered = store.start_instance(&new_instance_id().unwrap()).unwrap();
        assert_eq!(recovered, vec![Recovered { instance: "dead-instance".into(), generations: 1, credits: 1 }]);
        assert!(!store.refund(lost, 500, "again").unwrap());
        assert_eq!(store.start_instance(&new_instance_id().unwrap()).unwrap(), vec![]);
        assert_eq!(store.credits(&key).unwrap(), Some(1));
        let rows = store.usage("alice").unwrap();
        assert_eq!(rows.iter().map(|g| g.state.as_str()).collect::<Vec<_>>(), ["served", "refunded", "refunded"]);
        store.stop_instance(&me).unwrap();
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
        assert!(store.revoke("bob").unwrap() && !store.revoke("bob").unwrap());
        assert_eq!(store.key_state(&key).unwrap(), KeyState::Active { credits: 0 });
        assert!(store.list().unwrap()[1].revoked);
    }
}
