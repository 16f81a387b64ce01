//! The `x-origin-error` header as a typed value: what happened to the primary,
//! what failover did, and what the secondary did. Its `Display` is the header.

use crate::policy::Tier;
use crate::request::decision::FailoverSkip;
use std::fmt;

/// The longest proxy-supplied cause copied into `x-origin-error`.
pub const MAX_CAUSE_LEN: usize = 120;

/// Text from a request or the proxy, made fit for a response header: printable
/// ASCII only (anything else becomes `?`), at most [`MAX_CAUSE_LEN`] characters.
pub(crate) fn header_text(text: &str) -> String {
    text.chars()
        .take(MAX_CAUSE_LEN)
        .map(|c| if matches!(c, ' '..='~') { c } else { '?' })
        .collect()
}

/// What happened to the first origin a request was sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryFailure {
    /// The origin answered with this status (a 5xx, or one a failover rule names).
    Answered(u16),
    /// The origin never answered; the text is the [`crate::FetchFailure`]'s.
    Unreachable(String),
    /// It failed and the request was retried on the next origin; Envoy keeps
    /// only the last attempt's answer.
    Failed,
    /// Marked down after repeated failures: the request went straight to the
    /// next origin.
    MarkedDown,
}

/// What the next origin did, when it failed too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecondaryFailure {
    Answered(u16),
    Unreachable(String),
}

/// What failover did after the first origin failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailoverOutcome {
    /// Not a failover status, or no next origin: nothing to say.
    None,
    Skipped(FailoverSkip),
    /// The request went to the next origin, of this tier; `Some` when that failed too.
    Next(Tier, Option<SecondaryFailure>),
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
            PrimaryFailure::Failed => f.write_str("orig failed"),
            PrimaryFailure::MarkedDown => f.write_str("orig marked down"),
        }
    }
}

impl fmt::Display for OriginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.primary)?;
        match &self.failover {
            FailoverOutcome::None => Ok(()),
            FailoverOutcome::Skipped(FailoverSkip::Method(method)) => {
                write!(f, "; failover=skipped (method {})", header_text(method))
            }
            FailoverOutcome::Skipped(FailoverSkip::BodySize { limit }) => {
                write!(f, "; failover=skipped (request body over {limit} bytes)")
            }
            FailoverOutcome::Next(tier, None) => write!(f, "; failover={}", tier.as_str()),
            FailoverOutcome::Next(tier, Some(SecondaryFailure::Answered(status))) => write!(
                f,
                "; failover={t}; {t} response {status} error",
                t = tier.as_str()
            ),
            FailoverOutcome::Next(tier, Some(SecondaryFailure::Unreachable(why))) => {
                // The cause reads "orig ..." for whichever origin it was.
                let why = why.strip_prefix("orig ").unwrap_or(why);
                write!(f, "; failover={t}; {t} {why}", t = tier.as_str())
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
        e.failover = FailoverOutcome::Skipped(FailoverSkip::Method("POST".into()));
        assert_eq!(
            e.to_string(),
            "orig response 503 error; failover=skipped (method POST)"
        );
        let e = OriginError {
            primary: PrimaryFailure::Failed,
            failover: FailoverOutcome::Next(
                Tier::Secondary,
                Some(SecondaryFailure::Unreachable(
                    "orig connect failed (Connection refused)".into(),
                )),
            ),
        };
        assert_eq!(
            e.to_string(),
            "orig failed; failover=secondary; secondary connect failed (Connection refused)"
        );
        let down = OriginError {
            primary: PrimaryFailure::MarkedDown,
            failover: FailoverOutcome::Next(Tier::Secondary, None),
        };
        assert_eq!(down.to_string(), "orig marked down; failover=secondary");
    }
}
