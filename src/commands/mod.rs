//! One module per `sdkd` subcommand: its clap arguments and what it does. `main.rs` only parses
//! and reports.
pub mod bench;
pub mod convert;
pub mod demo;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod keys;
pub mod plan;
pub mod preprocess;
pub mod prune;
pub mod serve;
pub mod synth;
pub mod train;
