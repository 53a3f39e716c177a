//! Distillation training: optimizer, checkpoints, logging and progress (the trainer, students
//! and losses build on these).
pub mod checkpoint;
pub mod optim;
pub mod progress;
pub mod tensorboard;
