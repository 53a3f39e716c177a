//! Distillation: students and their copy map, losses, the trainer and its state.
pub mod student;
pub mod loss;
