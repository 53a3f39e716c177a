//! Distillation: students and their copy map, losses, optimizer, checkpoints, logging, the
//! distillation step (`step`) and the trainer that feeds it a run's data (`trainer`).
pub mod checkpoint;
pub mod encoder;
pub mod evaluate;
pub mod lcd;
pub mod lcm;
pub mod loss;
pub mod loss_scale;
pub mod optim;
pub mod progress;
pub mod scalars;
pub mod step;
pub mod student;
pub mod tensorboard;
pub mod trainer;
pub mod zero;
