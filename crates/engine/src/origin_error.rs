//! The `x-origin-error` header as a typed value: what happened to the primary,
//! what failover did, and what the secondary did. Its `Display` is the header.

use std::fmt;

/// Text from a request or the proxy, made fit for a response header: printable
/// ASCII only (anything else becomes `?`), at most [`crate::fetch::MAX_CAUSE_LEN`] characters.
pub(crate) fn header_text(text: &str) -> String {
    text.chars()
        .take(crate::fetch::MAX_CAUSE_LEN)
        .map(|c| if matches!(c, ' '..='~') { c } else { '?' })
        .collect()
}

/// What went wrong with the primary origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryFailure {
    /// The origin answered with this 5xx.
    Answered(u16),
    /// The origin never answered; the text is the [`crate::FetchFailure`]'s.
    Unreachable(String),
}

/// Why the secondary origin's answer could not be relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecondaryFailure {
    Timeout,
    /// The proxy could not reach the secondary; its reason when it gave one.
    Connect(Option<String>),
    /// The secondary answered with this 5xx.
    Answered(u16),
    BodyTooLarge {
        bytes: usize,
        limit: u32,
    },
}

impl SecondaryFailure {
    /// The status the viewer gets.
    pub fn status(&self) -> u16 {
        match self {
            SecondaryFailure::Timeout => 504,
            _ => 502,
        }
    }
}

/// What failover did after the primary failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailoverOutcome {
    /// Not a failover status, or no secondary origin: nothing to say.
    None,
    SkippedForMethod(String),
    SkippedForBodySize {
        limit: u32,
    },
    /// The request was not kept for a replay (the policy had no failover plan
    /// when the request started).
    SkippedNotKept,
    /// The secondary could not even be asked.
    DispatchFailed {
        cluster: String,
        why: String,
    },
    /// The request went to the secondary; `Some` when that failed too.
    Secondary(Option<SecondaryFailure>),
}

/// The `x-origin-error` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginError {
    pub primary: PrimaryFailure,
    pub failover: FailoverOutcome,
}

impl OriginError {
    pub fn new(primary: PrimaryFailure) -> Self {
        OriginError {
            primary,
            failover: FailoverOutcome::None,
        }
    }
}

impl fmt::Display for PrimaryFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrimaryFailure::Answered(status) => write!(f, "orig response {status} error"),
            PrimaryFailure::Unreachable(why) => f.write_str(why),
        }
    }
}

impl fmt::Display for SecondaryFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecondaryFailure::Timeout => f.write_str("secondary timeout"),
            SecondaryFailure::Connect(None) => f.write_str("secondary connect failure"),
            SecondaryFailure::Connect(Some(why)) => write!(f, "secondary connect failure ({why})"),
            SecondaryFailure::Answered(status) => write!(f, "secondary response {status} error"),
            SecondaryFailure::BodyTooLarge { bytes, limit } => write!(
                f,
                "secondary response body of {bytes} bytes is over the {limit}-byte limit"
            ),
        }
    }
}

impl fmt::Display for OriginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.primary)?;
        match &self.failover {
            FailoverOutcome::None => Ok(()),
            FailoverOutcome::SkippedForMethod(method) => {
                write!(f, "; failover=skipped (method {method})")
            }
            FailoverOutcome::SkippedForBodySize { limit } => {
                write!(f, "; failover=skipped (request body over {limit} bytes)")
            }
            FailoverOutcome::SkippedNotKept => f.write_str("; failover=skipped (request not kept)"),
            FailoverOutcome::DispatchFailed { cluster, why } => {
                write!(
                    f,
                    "; failover=failed (could not reach cluster {cluster}: {why})"
                )
            }
            FailoverOutcome::Secondary(None) => f.write_str("; failover=secondary"),
            FailoverOutcome::Secondary(Some(failure)) => {
                write!(f, "; failover=secondary; {failure}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_names_each_part() {
        let mut e = OriginError::new(PrimaryFailure::Answered(503));
        assert_eq!(e.to_string(), "orig response 503 error");
        e.failover = FailoverOutcome::SkippedForMethod("POST".into());
        assert_eq!(
            e.to_string(),
            "orig response 503 error; failover=skipped (method POST)"
        );
        e.failover = FailoverOutcome::Secondary(Some(SecondaryFailure::Connect(Some(
            "remote connection failure".into(),
        ))));
        assert_eq!(
            e.to_string(),
            "orig response 503 error; failover=secondary; secondary connect failure (remote connection failure)"
        );
        let refused = OriginError {
            primary: PrimaryFailure::Unreachable("orig connect failed (Connection refused)".into()),
            failover: FailoverOutcome::Secondary(None),
        };
        assert_eq!(
            refused.to_string(),
            "orig connect failed (Connection refused); failover=secondary"
        );
    }
}
