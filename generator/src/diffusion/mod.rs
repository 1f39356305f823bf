//! Gaussian diffusion over word-embedding latents: schedules, respacing and the samplers.

pub mod clamp;
pub mod likelihood;
pub mod sampler;
pub mod schedule;

pub use sampler::{SampleOptions, Sampler, SamplerKind, Samples};
pub use schedule::{NoiseSchedule, ScheduleKind};
