//! Where the engine runs: `cpu`, `cuda[:N]` or `auto`, and a GPU's memory.
//!
//! CUDA exists only in builds with the `cuda` feature; elsewhere asking for it is an
//! error that says so, and `auto` is the CPU.

use candle_core::{Device, DeviceLocation};

use crate::error::{Error, Result};

/// What a device spec names.
enum Spec {
    Cpu,
    Cuda(usize),
    /// GPU 0 where one is usable, else the CPU.
    Auto,
}

fn parse_spec(spec: &str) -> Result<Spec> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Spec::Cpu),
        "auto" => Ok(Spec::Auto),
        "cuda" => Ok(Spec::Cuda(0)),
        _ => spec
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Spec::Cuda)
            .ok_or_else(|| {
                Error::invalid_argument(
                    "device",
                    format!("'{spec}' (expected cpu, cuda, cuda:N or auto)"),
                )
            }),
    }
}

/// The device a spec names: `cpu`, `cuda` (GPU 0), `cuda:N`, or `auto` (GPU 0 where
/// one is usable, else the CPU), opened.
pub fn parse_device(spec: &str) -> Result<Device> {
    match parse_spec(spec)? {
        Spec::Cpu => Ok(Device::Cpu),
        Spec::Cuda(ordinal) => cuda(ordinal),
        Spec::Auto => Ok(cuda(0).unwrap_or(Device::Cpu)),
    }
}

/// The name (`cpu` or `cuda:N`) of the device a spec names, without opening it (a
/// GPU's context, cuBLAS handle and streams are made once, by the engine that
/// uses them). `auto` is `cuda:0` where the driver sees a GPU.
pub fn resolve_device_name(spec: &str) -> Result<String> {
    Ok(match parse_spec(spec)? {
        Spec::Cpu => "cpu".into(),
        Spec::Cuda(ordinal) => {
            require_cuda_build()?;
            format!("cuda:{ordinal}")
        }
        Spec::Auto if gpu_count() > 0 => "cuda:0".into(),
        Spec::Auto => "cpu".into(),
    })
}

/// GPUs the driver sees (0 without the `cuda` feature or a driver).
fn gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    0
}

fn require_cuda_build() -> Result<()> {
    if candle_core::utils::cuda_is_available() {
        return Ok(());
    }
    Err(Error::DeviceUnavailable(
        "this build of zse has no CUDA support: build the CUDA wheel \
         (scripts/build-cuda-wheel) to run on an NVIDIA GPU"
            .into(),
    ))
}

fn cuda(ordinal: usize) -> Result<Device> {
    require_cuda_build()?;
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
        assert_eq!(resolve_device_name("cpu").unwrap(), "cpu");
        assert_eq!(gpu_memory(&Device::Cpu).unwrap(), None);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_cuda_is_refused_and_auto_is_the_cpu() {
        assert!(parse_device("auto").unwrap().is_cpu());
        assert_eq!(resolve_device_name("auto").unwrap(), "cpu");
        for spec in ["cuda", "cuda:1"] {
            let msg = parse_device(spec).unwrap_err().to_string();
            assert!(msg.contains("no CUDA support"), "{msg}");
            let msg = resolve_device_name(spec).unwrap_err().to_string();
            assert!(msg.contains("no CUDA support"), "{msg}");
        }
    }
}
