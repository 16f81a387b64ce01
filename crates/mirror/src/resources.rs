//! What a run mirrors: a domain's paths, from a list file or a sitemap.

use object_store::path::{Path as ObjectKey, PathPart};
use percent_encoding::percent_decode_str;

/// Keys under this first segment are the mirror's own bookkeeping.
pub(crate) const RESERVED_SEGMENT: &str = ".origin-policy";
const MAX_PATH_BYTES: usize = 2048;

/// One path of the domain, checked: absolute, without query or fragment,
/// without dot segments, UTF-8 once `%`-decoded. The same path is asked of
/// the origin and names the stored object, so the store can never be
/// written outside its root.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourcePath {
    text: String,
    /// The key a bucket serves this path from.
    bucket_key: ObjectKey,
}

impl ResourcePath {
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("`{text}` is not a path: it must start with `/`"));
        };
        if text.len() > MAX_PATH_BYTES {
            return Err(format!("path longer than {MAX_PATH_BYTES} bytes"));
        }
        if let Some(c) = text
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || *c == '?' || *c == '#')
        {
            return Err(format!(
                "`{text}`: {c:?} not allowed (no query strings, fragments or spaces: a mirror serves paths)"
            ));
        }
        let segments: Vec<&str> = rest.split('/').collect();
        let last = segments.len() - 1;
        for (i, segment) in segments.iter().enumerate() {
            let decoded = percent_decode_str(segment).decode_utf8().map_err(|_| {
                format!("`{text}`: not UTF-8 once `%`-decoded (a bucket key is UTF-8)")
            })?;
            if segment.is_empty() && i != last {
                return Err(format!("`{text}`: empty segment (`//`)"));
            }
            if matches!(decoded.as_ref(), "." | "..") || decoded.contains('/') {
                return Err(format!(
                    "`{text}`: dot segments and encoded `/` are not allowed"
                ));
            }
            if decoded.chars().any(char::is_control) {
                return Err(format!("`{text}`: an encoded control character"));
            }
            if i == 0 && decoded == RESERVED_SEGMENT {
                return Err(format!(
                    "`{text}`: `/{RESERVED_SEGMENT}/` is reserved for the mirror's own files"
                ));
            }
        }
        // What S3 does with the path of a request: `%`-decoded, the rest as
        // written (`+` stays `+`).
        let mut decoded = percent_decode_str(rest).decode_utf8_lossy().into_owned();
        if decoded.is_empty() || decoded.ends_with('/') {
            decoded.push_str("index.html");
        }
        let bucket_key =
            ObjectKey::parse(&decoded).map_err(|e| format!("`{text}`: not a bucket key: {e}"))?;
        Ok(ResourcePath {
            text: text.to_owned(),
            bucket_key,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The object's key in a directory: the path's segments, percent-decoded
    /// then encoded as object_store names files (`%`, `#` and the like
    /// escaped, a file name any system takes); a directory (`/`, `/docs/`) is
    /// stored as its `index.html`.
    pub fn key(&self) -> ObjectKey {
        let rest = self.text.trim_start_matches('/');
        let mut parts: Vec<PathPart<'static>> = rest
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| PathPart::from(percent_decode_str(s).decode_utf8_lossy().into_owned()))
            .collect();
        if rest.is_empty() || rest.ends_with('/') {
            parts.push(PathPart::from("index.html"));
        }
        ObjectKey::from_iter(parts)
    }

    /// The object's key in a bucket: the path `%`-decoded, as the bucket
    /// decodes the edge's request for it (`/caf%C3%A9/50%25.html` is the key
    /// `café/50%.html`); a directory is its `index.html`, which a bucket's
    /// REST endpoint serves only as `/docs/index.html`.
    pub fn bucket_key(&self) -> ObjectKey {
        self.bucket_key.clone()
    }
}

impl std::fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A list file's paths, and the lines not mirrored, with why.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PathList {
    pub paths: Vec<ResourcePath>,
    /// `(line number, why)`.
    pub skipped: Vec<(usize, String)>,
}

/// A list file: one path per line; blank lines and `#` comments skipped.
/// A line with a query string is skipped with why (the secondary serves a
/// path the same whatever the query); any other invalid line is an error
/// naming its line number.
pub fn parse_path_list(text: &str) -> Result<PathList, (usize, String)> {
    let mut out = PathList::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((path, _)) = line.split_once('?') {
            out.skipped.push((
                i + 1,
                format!(
                    "`{line}`: a query string is not mirrored (a bucket and mirror-serve answer `{path}` whatever the query; list `{path}` to mirror it)"
                ),
            ));
            continue;
        }
        out.paths
            .push(ResourcePath::parse(line).map_err(|why| (i + 1, why))?);
    }
    Ok(out)
}

/// What one sitemap document lists.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SitemapEntries {
    /// `<urlset>`: the pages.
    pub paths: Vec<ResourcePath>,
    /// `<sitemapindex>`: further sitemaps.
    pub sitemaps: Vec<ResourcePath>,
    /// Locations not mirrored (another host, a query string), with why.
    pub skipped: Vec<String>,
}

/// Reads a sitemap (sitemaps.org 0.9): a `<urlset>` or a `<sitemapindex>`.
/// Only locations on `domain` are taken.
pub fn parse_sitemap(xml: &str, domain: &str) -> Result<SitemapEntries, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("not XML: {e}"))?;
    let root = doc.root_element();
    let (entry, index) = match root.tag_name().name() {
        "urlset" => ("url", false),
        "sitemapindex" => ("sitemap", true),
        other => {
            return Err(format!(
                "root element <{other}>: a sitemap is a <urlset> or a <sitemapindex>"
            ))
        }
    };
    let mut out = SitemapEntries::default();
    let locs = root
        .children()
        .filter(|n| n.has_tag_name(entry))
        .filter_map(|n| n.children().find(|c| c.has_tag_name("loc")))
        .filter_map(|loc| loc.text())
        .map(str::trim);
    for loc in locs {
        match path_on_domain(loc, domain) {
            Ok(path) if index => out.sitemaps.push(path),
            Ok(path) => out.paths.push(path),
            Err(why) => out.skipped.push(format!("{loc}: {why}")),
        }
    }
    Ok(out)
}

fn path_on_domain(loc: &str, domain: &str) -> Result<ResourcePath, String> {
    let url = url::Url::parse(loc).map_err(|e| format!("not a URL ({e})"))?;
    if !url
        .host_str()
        .is_some_and(|h| h.eq_ignore_ascii_case(domain))
    {
        return Err(format!("not on {domain}"));
    }
    if url.query().is_some() {
        return Err("has a query string".to_owned());
    }
    ResourcePath::parse(url.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_and_keyed() {
        let p = ResourcePath::parse("/img/a%20b.png").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            p.key().as_ref(),
            ObjectKey::from_iter(["img", "a b.png"]).as_ref()
        );
        let dir = ResourcePath::parse("/docs/").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(dir.key().as_ref(), "docs/index.html");
        let root = ResourcePath::parse("/").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(root.key().as_ref(), "index.html");
        for bad in [
            "img/a.png",
            "/a?b=1",
            "/a#top",
            "/a//b",
            "/../etc/passwd",
            "/a/%2e%2e/b",
            "/a%2Fb",
            "/.origin-policy/mirror.json",
            "/a b",
        ] {
            assert!(ResourcePath::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_list_names_the_line_of_a_bad_path() {
        let list = "# the site\n/index.html\n\n/a.css\nnot-a-path\n";
        assert_eq!(parse_path_list(list).map_err(|e| e.0), Err(5));
        let ok = parse_path_list("/a\n  /b  \n").unwrap_or_default();
        assert_eq!(ok.paths.len(), 2);
    }

    #[test]
    fn a_list_line_with_a_query_is_skipped_with_why() {
        let got = parse_path_list("/a.js\n/a.js?v=3\n/b\n").unwrap_or_default();
        let paths: Vec<&str> = got.paths.iter().map(ResourcePath::as_str).collect();
        assert_eq!(paths, ["/a.js", "/b"]);
        assert_eq!(got.skipped.len(), 1);
        assert_eq!(got.skipped[0].0, 2);
        assert!(
            got.skipped[0].1.contains("list `/a.js` to mirror it"),
            "{:?}",
            got.skipped
        );
    }

    #[test]
    fn a_bucket_key_is_the_path_as_the_bucket_decodes_it() {
        for (path, key) in [
            ("/caf%C3%A9/men%C3%BC.html", "café/menü.html"),
            ("/files/50%25off.html", "files/50%off.html"),
            ("/a%20b+c.png", "a b+c.png"),
            ("/x/(1)!$&'*,;=:@~.txt", "x/(1)!$&'*,;=:@~.txt"),
            ("/docs/", "docs/index.html"),
            ("/", "index.html"),
        ] {
            let p = ResourcePath::parse(path).unwrap_or_else(|e| unreachable!("{e}"));
            assert_eq!(p.bucket_key().as_ref(), key, "{path}");
        }
        // The local key of the same path is a safe file name.
        let p = ResourcePath::parse("/files/50%25off.html").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(p.key().as_ref(), "files/50%25off.html");
        for bad in ["/%FF.html", "/a%0Ab", "/a%00"] {
            assert!(ResourcePath::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_sitemap_yields_the_domain_paths_only() {
        let xml = r#"<?xml version="1.0"?>
<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
  <url><loc>https://static.example.com/</loc></url>
  <url><loc> https://STATIC.example.com/a.css </loc><lastmod>2026-01-01</lastmod></url>
  <url><loc>https://other.example.com/b.css</loc></url>
  <url><loc>https://static.example.com/c?x=1</loc></url>
</urlset>"#;
        let got = parse_sitemap(xml, "static.example.com").unwrap_or_default();
        let paths: Vec<&str> = got.paths.iter().map(ResourcePath::as_str).collect();
        assert_eq!(paths, ["/", "/a.css"]);
        assert_eq!(got.skipped.len(), 2);
        let index = r#"<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
  <sitemap><loc>https://static.example.com/sitemap-1.xml</loc></sitemap></sitemapindex>"#;
        let got = parse_sitemap(index, "static.example.com").unwrap_or_default();
        assert_eq!(got.sitemaps.len(), 1);
        assert!(parse_sitemap("<html/>", "x").is_err());
        assert!(parse_sitemap("not xml", "x").is_err());
    }
}
