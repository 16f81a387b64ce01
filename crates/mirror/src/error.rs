//! One error type for the mirror: every message names the domain, and the
//! path or file it is about.

use std::fmt;

/// Why one resource was not stored this run; its previous copy, if any, stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceFailure {
    /// No connection: refused, reset, unreachable or no address.
    Unreachable(String),
    /// The TLS handshake failed, e.g. the certificate does not name the SNI.
    Tls(String),
    /// The origin did not answer, or did not finish the body, in time.
    Timeout(String),
    /// The origin answered with a status that is neither stored nor gone.
    Status(u16),
    /// The body is (or announced to be) larger than the per-object limit.
    TooLarge { limit: u64 },
    /// Storing the body would take the store past its size limit.
    StoreFull { limit: u64 },
    /// The redirects came back to a path already visited.
    RedirectLoop(Vec<String>),
    /// More redirects than allowed.
    TooManyRedirects(usize),
    /// A redirect to another host: only the domain's own paths are mirrored.
    RedirectElsewhere(String),
    /// The store refused this object (e.g. a key or a header it does not take).
    Store(String),
    /// The store refuses as a whole (unreachable, no space left): the run stops.
    StoreUnavailable(String),
    /// Anything else the HTTP exchange reported.
    Http(String),
}

impl fmt::Display for ResourceFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResourceFailure::Unreachable(why) => write!(f, "origin unreachable: {why}"),
            ResourceFailure::Tls(why) => write!(f, "TLS handshake failed: {why}"),
            ResourceFailure::Timeout(why) => write!(f, "timed out: {why}"),
            ResourceFailure::Status(s) => write!(f, "origin answered {s}"),
            ResourceFailure::TooLarge { limit } => write!(
                f,
                "body larger than the object limit of {limit} bytes (--max-object-bytes)"
            ),
            ResourceFailure::StoreFull { limit } => write!(
                f,
                "the store would exceed its limit of {limit} bytes (--max-store-bytes)"
            ),
            ResourceFailure::RedirectLoop(hops) => {
                write!(f, "redirect loop: {}", hops.join(" -> "))
            }
            ResourceFailure::TooManyRedirects(n) => {
                write!(f, "more than {n} redirects (--max-redirects)")
            }
            ResourceFailure::RedirectElsewhere(to) => {
                write!(
                    f,
                    "redirects to another host ({to}); only the domain's own paths are mirrored"
                )
            }
            ResourceFailure::Store(why) => write!(f, "store write failed: {why}"),
            ResourceFailure::StoreUnavailable(why) => write!(f, "store unavailable: {why}"),
            ResourceFailure::Http(why) => write!(f, "HTTP error: {why}"),
        }
    }
}

/// The store refused a write or a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    pub why: String,
    /// The store refuses as a whole (unreachable, no space left), not this
    /// object only: the next objects would meet the same refusal.
    pub store_wide: bool,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.why)
    }
}

impl From<StoreError> for ResourceFailure {
    fn from(e: StoreError) -> Self {
        if e.store_wide {
            ResourceFailure::StoreUnavailable(e.why)
        } else {
            ResourceFailure::Store(e.why)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorError {
    /// The policy cannot be mirrored (unknown domain, no primary origin...).
    Policy { domain: String, why: String },
    /// A list of paths (a file or a sitemap) could not be read.
    List {
        domain: String,
        source: String,
        line: Option<usize>,
        why: String,
    },
    /// The object store could not be opened, read or written as a whole.
    Store { location: String, why: String },
    /// One resource was not stored.
    Resource {
        domain: String,
        path: String,
        failure: ResourceFailure,
    },
    /// The run was stopped (a signal) before every resource was done.
    Stopped {
        domain: String,
        done: u64,
        listed: u64,
    },
    /// The store became unavailable during the run: the run stopped there.
    StoreUnavailable {
        location: String,
        done: u64,
        listed: u64,
        why: String,
    },
}

impl fmt::Display for MirrorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MirrorError::Policy { domain, why } => write!(f, "{domain}: {why}"),
            MirrorError::List {
                domain,
                source,
                line: Some(line),
                why,
            } => write!(f, "{domain}: {source}:{line}: {why}"),
            MirrorError::List {
                domain,
                source,
                why,
                ..
            } => write!(f, "{domain}: {source}: {why}"),
            MirrorError::Store { location, why } => write!(f, "store {location}: {why}"),
            MirrorError::Resource {
                domain,
                path,
                failure,
            } => write!(f, "{domain} {path}: {failure}; previous copy (if any) kept"),
            MirrorError::Stopped {
                domain,
                done,
                listed,
            } => write!(
                f,
                "{domain}: stopped after {done} of {listed} resources; what was stored is whole and recorded, the next run goes on"
            ),
            MirrorError::StoreUnavailable {
                location,
                done,
                listed,
                why,
            } => write!(
                f,
                "store {location} unavailable ({why}): the run stopped after {done} of {listed} resources; what was stored is whole, the previous copies of the others stay"
            ),
        }
    }
}

impl std::error::Error for MirrorError {}
