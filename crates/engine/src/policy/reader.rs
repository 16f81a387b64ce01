//! A JSON field reader that reports every finding at once, each with the
//! source, the domain and the JSON pointer it concerns. Derive-based parsing
//! stops at the first error; operators want the whole list.

use crate::policy::diagnostic::{pointer_segment, PolicyDiagnostic, Severity};
use crate::policy::host::normalize_host;
use serde_json::{Map, Value};

/// Collects findings for one policy document.
pub(crate) struct Findings<'s> {
    source: &'s str,
    domain: Option<String>,
    list: Vec<PolicyDiagnostic>,
}

impl<'s> Findings<'s> {
    pub(crate) fn new(source: &'s str) -> Self {
        Findings {
            source,
            domain: None,
            list: Vec::new(),
        }
    }

    pub(crate) fn into_list(self) -> Vec<PolicyDiagnostic> {
        self.list
    }

    /// Names the domain in every later finding.
    pub(crate) fn set_domain(&mut self, domain: &str) {
        self.domain = Some(domain.to_owned());
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.list.iter().any(|d| d.severity == Severity::Error)
    }

    fn push(&mut self, severity: Severity, path: &str, message: String, fix: Option<String>) {
        self.list.push(PolicyDiagnostic {
            severity,
            source: self.source.to_owned(),
            domain: self.domain.clone(),
            path: path.to_owned(),
            message,
            fix,
        });
    }

    pub(crate) fn error(&mut self, path: &str, message: impl Into<String>) {
        self.push(Severity::Error, path, message.into(), None);
    }

    pub(crate) fn error_with_fix(
        &mut self,
        path: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(Severity::Error, path, message.into(), Some(fix.into()));
    }

    pub(crate) fn warn(&mut self, path: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Severity::Warning, path, message.into(), Some(fix.into()));
    }
}

/// A JSON object whose keys are checked off as they are read, so that the
/// leftovers can be reported as unknown fields.
pub(crate) struct FieldReader<'v> {
    map: &'v Map<String, Value>,
    path: String,
    read: Vec<&'static str>,
}

impl<'v> FieldReader<'v> {
    pub(crate) fn open(f: &mut Findings, value: &'v Value, path: &str) -> Option<Self> {
        match value {
            Value::Object(map) => Some(FieldReader {
                map,
                path: path.to_owned(),
                read: Vec::new(),
            }),
            other => {
                f.error(path, format!("expected an object, found {}", kind(other)));
                None
            }
        }
    }

    pub(crate) fn field(&mut self, key: &'static str) -> Option<(&'v Value, String)> {
        self.read.push(key);
        self.map
            .get(key)
            .map(|v| (v, format!("{}/{}", self.path, key)))
    }

    pub(crate) fn finish(self, f: &mut Findings) {
        for key in self.map.keys() {
            if !self.read.contains(&key.as_str()) && key != "$schema" && key != "comment" {
                let path = format!("{}/{}", self.path, pointer_segment(key));
                f.error(&path, format!("unknown field `{key}`"));
            }
        }
    }
}

pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn string<'v>(f: &mut Findings, value: &'v Value, path: &str) -> Option<&'v str> {
    match value {
        Value::String(s) => Some(s),
        other => {
            f.error(path, format!("expected a string, found {}", kind(other)));
            None
        }
    }
}

pub(crate) fn integer_in(
    f: &mut Findings,
    value: &Value,
    path: &str,
    lo: u64,
    hi: u64,
    what: &str,
) -> Option<u64> {
    match value.as_u64() {
        Some(n) if (lo..=hi).contains(&n) => Some(n),
        Some(n) => {
            f.error(path, format!("{what} {n} is outside {lo}-{hi}"));
            None
        }
        // The number as JSON writes it; shown without serialising a `Value`.
        None if value.is_number() => {
            if let Some(n) = value.as_number() {
                f.error(path, format!("{what} {n} is outside {lo}-{hi}"));
            }
            None
        }
        None => {
            f.error(
                path,
                format!("expected an integer {what}, found {}", kind(value)),
            );
            None
        }
    }
}

pub(crate) fn port(f: &mut Findings, value: &Value, path: &str) -> Option<u16> {
    integer_in(f, value, path, 1, 65_535, "port").and_then(|p| u16::try_from(p).ok())
}

/// `text` as a message shows it: quotes, backslashes and control characters
/// escaped as Rust writes them (`\t`, `\u{1b}`). Written here rather than with
/// `escape_debug`, whose Unicode printability tables the filter's module
/// would carry.
pub(crate) fn escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\\' | '"' | '\'' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {
                out.push_str("\\u{");
                out.push_str(&format!("{:x}", u32::from(c)));
                out.push('}');
            }
            c => out.push(c),
        }
    }
    out
}

/// A value that goes into a header or the TLS handshake: no controls, no spaces.
pub(crate) fn header_safe(f: &mut Findings, text: &str, path: &str, what: &str) -> bool {
    if text.is_empty() {
        f.error(path, format!("{what} is empty"));
        return false;
    }
    if let Some(bad) = text.chars().find(|c| c.is_control() || c.is_whitespace()) {
        f.error(
            path,
            format!(
                "{what} `{}` contains '{}', which is not allowed",
                escaped(text),
                escaped(bad.encode_utf8(&mut [0; 4]))
            ),
        );
        return false;
    }
    true
}

pub(crate) fn host_name(f: &mut Findings, text: &str, path: &str, what: &str) -> Option<String> {
    if !header_safe(f, text, path, what) {
        return None;
    }
    match normalize_host(text) {
        Ok(name) => Some(name.into_owned()),
        Err(e) => {
            f.error(path, format!("{what} `{text}`: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::escaped;

    #[test]
    fn escaped_writes_what_escape_debug_writes_for_ascii() {
        for text in [
            "plain",
            "tab\there",
            "a\r\nb",
            "q\"u'o\\te",
            "bell\u{7}",
            "esc\u{1b}[0m",
        ] {
            assert_eq!(escaped(text), text.escape_debug().to_string(), "{text:?}");
        }
    }
}
