//! Which device runs the model: `--device auto|cpu|cuda:N`.
//!
//! The CUDA backend is compiled only with the `cuda` cargo feature (`deploy/gpu/build.sh`); a default
//! build is CPU-only and says so when asked for `cuda:N`. `auto` takes GPU 0 when the binary has CUDA
//! and a GPU answers, and the CPU otherwise, so one deployment manifest serves both kinds of node.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "device",
                format!("`{s}`: expected auto, cpu, cuda or cuda:N"),
            )
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(bad),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether this binary was built with the CUDA backend.
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

impl DeviceChoice {
    /// The candle device. `auto` falls back to the CPU (with a log line saying why); an explicit
    /// `cuda:N` that cannot be opened is an error naming the flag.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto if !CUDA_COMPILED => Ok(Device::Cpu),
            Self::Auto => match Device::new_cuda(0) {
                Ok(device) => Ok(device),
                Err(err) => {
                    let err = first_line(&err);
                    tracing::warn!(err, "no usable GPU: running on the CPU");
                    Ok(Device::Cpu)
                }
            },
            Self::Cuda(n) if !CUDA_COMPILED => Err(Error::invalid(
                "device",
                format!(
                    "cuda:{n} asked for, but this binary was built without the `cuda` feature \
                     (build one with deploy/gpu/build.sh)"
                ),
            )),
            Self::Cuda(n) => Device::new_cuda(n).map_err(|err| {
                let err = first_line(&err);
                Error::invalid("device", format!("cuda:{n} cannot be opened: {err}"))
            }),
        }
    }
}

/// candle's CUDA errors carry a backtrace after the message: keep the message.
fn first_line(err: &candle_core::Error) -> String {
    err.to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A short name for logs, metrics and reports: `cpu` or `cuda:N`.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// How many shards to split a batch over: the worker threads on the CPU (candle runs element-wise
/// ops on one core there), one on a GPU (which parallelises inside each kernel).
pub fn shards(device: &Device) -> usize {
    if device.is_cpu() {
        crate::runtime::threads()
    } else {
        1
    }
}

/// Waits for queued kernels, so that wall-clock timings mean what they say on a GPU.
pub fn synchronize(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_names_the_flag_otherwise() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        for bad in ["cuda:", "cuda:x", "tpu", ""] {
            let err = bad.parse::<DeviceChoice>().unwrap_err().to_string();
            assert!(
                err.contains("`device`") && err.contains("cuda:N"),
                "{bad}: {err}"
            );
        }
        for choice in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda(2)] {
            assert_eq!(choice.to_string().parse::<DeviceChoice>().unwrap(), choice);
        }
    }

    #[test]
    fn cpu_build_runs_auto_on_the_cpu_and_refuses_cuda_clearly() {
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
        if CUDA_COMPILED {
            return; // what `auto` and `cuda:N` give depends on the machine's GPU
        }
        let auto = DeviceChoice::Auto.open().unwrap();
        assert!(auto.is_cpu());
        assert_eq!(name(&auto), "cpu");
        assert_eq!(shards(&auto), crate::runtime::threads());
        let err = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
        assert!(
            err.contains("`device`") && err.contains("`cuda` feature"),
            "{err}"
        );
    }
}
