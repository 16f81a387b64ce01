//! Synthetic policy sets of any size, shared by the criterion benchmarks and
//! the wasmtime cost table so that both measure the same inputs.

/// Which kind of name the first policy (`i == 0`) has; the rest alternate.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum FirstDomain {
    Exact,
    Wildcard,
}

/// Policy `i` covers `site{i}.example.com` or `*.img{i}.example.com`.
pub fn domain(i: usize, first: FirstDomain) -> String {
    let wildcard = (i % 2 == 1) != (first == FirstDomain::Wildcard);
    if wildcard {
        format!("*.img{i}.example.com")
    } else {
        format!("site{i}.example.com")
    }
}

/// A viewer host that policy `i` covers.
pub fn host_for(i: usize, first: FirstDomain) -> String {
    let d = domain(i, first);
    match d.strip_prefix("*.") {
        Some(suffix) => format!("a.{suffix}"),
        None => d,
    }
}

/// A plugin configuration (`{settings, policies}`) with `n` policies.
pub fn plugin_config(n: usize, first: FirstDomain) -> String {
    let mut out = String::with_capacity(n * 120 + 100);
    out.push_str(r#"{"settings":{"unknown_domain":{"action":"pass_through"}},"policies":["#);
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"domain":"{}","primary":{{"address":"o{i}.example.net","port":443}}}}"#,
            domain(i, first)
        ));
    }
    out.push_str("]}");
    out
}
