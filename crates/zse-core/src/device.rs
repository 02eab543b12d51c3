//! Where the engine runs: `cpu`, `cuda[:N]` or `auto`, and a GPU's memory.
//!
//! CUDA exists only in builds with the `cuda` feature; elsewhere asking for it is an
//! error that says so, and `auto` is the CPU.

use candle_core::{Device, DeviceLocation};

use crate::error::{Error, Result};

/// The device a spec names: `cpu`, `cuda` (GPU 0), `cuda:N`, or `auto` (GPU 0 where
/// one is usable, else the CPU).
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(cuda(0).unwrap_or(Device::Cpu)),
        "cuda" | "gpu" => cuda(0),
        _ => {
            let ordinal = spec
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    Error::invalid_argument(
                        "device",
                        format!("'{spec}' (expected cpu, cuda, cuda:N or auto)"),
                    )
                })?;
            cuda(ordinal)
        }
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::DeviceUnavailable(
            "this build of zse has no CUDA support: build the CUDA wheel \
             (scripts/build-cuda-wheel) to run on an NVIDIA GPU"
                .into(),
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        // candle appends a backtrace to some errors: the first line says it all.
        let e = e.to_string();
        let cause = e.lines().next().unwrap_or_default();
        Error::DeviceUnavailable(format!("cannot use GPU cuda:{ordinal}: {cause}"))
    })
}

/// How the device is named to users: `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// A GPU's memory in bytes, as its driver reports it (every process's use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMemory {
    pub free: usize,
    pub total: usize,
}

impl GpuMemory {
    pub fn used(&self) -> usize {
        self.total.saturating_sub(self.free)
    }
}

/// The GPU's memory; None for the CPU.
pub fn gpu_memory(device: &Device) -> Result<Option<GpuMemory>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let stream = d.cuda_stream();
            let ctx = stream.context();
            ctx.bind_to_thread()
                .map_err(|e| Error::Compute(format!("CUDA context: {e}")))?;
            let (free, total) = ctx
                .mem_get_info()
                .map_err(|e| Error::Compute(format!("CUDA memory info: {e}")))?;
            Ok(Some(GpuMemory { free, total }))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_say_what_was_expected() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device(" CPU ").unwrap().is_cpu());
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1"] {
            let msg = parse_device(bad).unwrap_err().to_string();
            assert!(
                msg.contains("expected cpu, cuda, cuda:N or auto"),
                "{bad}: {msg}"
            );
        }
        assert_eq!(device_name(&Device::Cpu), "cpu");
        assert_eq!(gpu_memory(&Device::Cpu).unwrap(), None);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_cuda_is_refused_and_auto_is_the_cpu() {
        assert!(parse_device("auto").unwrap().is_cpu());
        for spec in ["cuda", "cuda:1"] {
            let msg = parse_device(spec).unwrap_err().to_string();
            assert!(msg.contains("no CUDA support"), "{msg}");
        }
    }
}
