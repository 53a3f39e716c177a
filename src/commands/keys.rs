//! `sdkd keys`: the API keys and credits of `sdkd serve` (one credit buys one image).
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
    /// Every key's name, credits, creation time and images served.
    List {
        #[arg(long)]
        db: PathBuf,
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
            let balance = KeyStore::open(db)?.credit(name, *add)?;
            println!("{name}: {balance} credits");
        }
        KeysAction::List { db } => {
            println!("{:<24} {:>10} {:>10}  created", "name", "credits", "images");
            for k in KeyStore::open(db)?.list()? {
                println!("{:<24} {:>10} {:>10}  {}", k.name, k.credits, k.images, k.created_at);
            }
        }
    }
    Ok(())
}
