//! Distillation: students and their copy map, losses, optimizer, checkpoints, logging, and the
//! trainer that runs them.
pub mod checkpoint;
pub mod encoder;
pub mod evaluate;
pub mod loss;
pub mod loss_scale;
pub mod optim;
pub mod progress;
pub mod student;
pub mod tensorboard;
pub mod trainer;
