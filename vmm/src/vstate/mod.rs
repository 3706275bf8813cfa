//! KVM state: the VM (memory, irqchip, PIT) and its vCPUs.

pub mod interrupts;
pub mod vcpu;
pub mod vm;

/// A failed KVM ioctl, named so the one-line error tells what broke.
#[derive(Debug, thiserror::Error)]
#[error("{ioctl} failed: {source}")]
pub struct KvmError {
    /// The ioctl (or step) that failed.
    pub ioctl: &'static str,
    /// The OS error.
    #[source]
    pub source: kvm_ioctls::Error,
}

/// Attach the ioctl name to a KVM error.
pub(crate) trait KvmContext<T> {
    fn kvm(self, ioctl: &'static str) -> Result<T, KvmError>;
}

impl<T> KvmContext<T> for Result<T, kvm_ioctls::Error> {
    fn kvm(self, ioctl: &'static str) -> Result<T, KvmError> {
        self.map_err(|source| KvmError { ioctl, source })
    }
}
