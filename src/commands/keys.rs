//! `sdkd keys`: the API keys and credits of `sdkd serve` (docs/serve.md prices the images).
use crate::serve::keys::KeyStore;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub action: KeysAction,
}

#[derive(Subcommand, Debug)]
pub enum KeysAction {
    /// Make a key; prints it (the only time it is shown: the database keeps its hash).
    Add {
        #[arg(long)]
        db: PathBuf,
        /// Who or what the key is for (unique).
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 0)]
        credits: i64,
    },
    /// Add credits to a key (a negative number takes them away, down to 0).
    Credit {
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, allow_negative_numbers = true)]
        add: i64,
    },
    /// Every key's name, credits, images served, creation time (and whether revoked).
    List {
        #[arg(long)]
        db: PathBuf,
    },
    /// Revoke a key: the server answers it 401 from now on (its credits and rows stay).
    Revoke {
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// A key's generation requests, one row each: state, credits, images, status, cause.
    Usage {
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        name: String,
    },
}

pub fn run(args: &KeysArgs) -> Result<()> {
    match &args.action {
        KeysAction::Add { db, name, credits } => {
            let key = KeyStore::create_or_open(db)?.add(name, *credits)?;
            eprintln!("key {name:?} with {credits} credits (store it now: it is not shown again)");
            println!("{key}");
        }
        KeysAction::Credit { db, name, add } => {
            let store = KeyStore::open(db)?;
            let balance = store.credit(name, *add)?;
            println!("{name}: {balance} credits");
            if store.is_revoked(name)? {
                eprintln!("warning: key {name:?} is revoked: the server refuses it (401) whatever its credits");
            }
        }
        KeysAction::List { db } => {
            println!("{:<24} {:>10} {:>10}  created", "name", "credits", "images");
            for k in KeyStore::open(db)?.list()? {
                let revoked = if k.revoked { "  revoked" } else { "" };
                println!("{:<24} {:>10} {:>10}  {}{revoked}", k.name, k.credits, k.images, k.created_at);
            }
        }
        KeysAction::Revoke { db, name } => {
            if KeyStore::open(db)?.revoke(name)? {
                println!("{name}: revoked");
            } else {
                println!("{name}: revoked already");
            }
        }
        KeysAction::Usage { db, name } => {
            println!("{:>6}  {:<24} {:<9} {:>8} {:>6} {:>6}  cause", "id", "created", "state", "credits", "images", "status");
            for g in KeyStore::open(db)?.usage(name)? {
                let status = g.status.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
                let cause = g.cause.unwrap_or_default();
                println!("{:>6}  {:<24} {:<9} {:>8} {:>6} {:>6}  {cause}", g.id, g.created_at, g.state, g.credits, g.images, status);
            }
        }
    }
    Ok(())
}
