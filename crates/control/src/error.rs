//! The control plane's one error type.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    /// The store could not be read or written; nothing was acknowledged.
    Store(String),
    /// A file, a socket or Envoy's admin endpoint failed.
    Io(String),
    /// The settings were refused; the findings say why.
    Settings(String),
    /// Envoy did not take the clusters a write needs, so it was not published.
    Envoy(String),
    /// Options that cannot go together.
    Usage(String),
    /// The TLS files (`--tls-*`) could not be read or used, or a listener
    /// would be open to the network without them.
    Tls(String),
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::Store(why) => write!(f, "store: {why}"),
            ControlError::Io(why) => f.write_str(why),
            ControlError::Settings(why) => write!(f, "settings rejected: {why}"),
            ControlError::Envoy(why) => write!(f, "Envoy: {why}"),
            ControlError::Usage(why) => f.write_str(why),
            ControlError::Tls(why) => write!(f, "TLS: {why}"),
        }
    }
}

impl std::error::Error for ControlError {}
