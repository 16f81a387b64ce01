//! The static origin for local stores: answers `GET`/`HEAD` from
//! `ROOT/<Host>/`, with the headers stored beside each body. This is the
//! secondary origin a policy names for a directory-backed mirror.

use crate::resources::ResourcePath;
use crate::store::{StoredHead, MAX_HEAD_LINE};
use bytes::Bytes;
use futures::TryStreamExt as _;
use http_body_util::{combinators::BoxBody, BodyExt as _, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST, IF_NONE_MATCH};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use object_store::local::LocalFileSystem;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncSeekExt as _, BufReader};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, std::io::Error>;

/// Names the answer as the mirror's: a viewer (and a test) can tell the
/// secondary served it.
pub const SERVED_BY_HEADER: &str = "x-origin-policy-mirror";

/// Serves until the listener fails; one task per connection.
pub async fn serve_stores(root: PathBuf, listener: TcpListener) -> std::io::Result<()> {
    let root = Arc::new(root);
    loop {
        let (stream, _) = listener.accept().await?;
        let root = root.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let root = root.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&root, req).await) }
            });
            // A viewer hanging up mid-body is not an error of the store.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(text + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The store directory for a Host: a DNS name, nothing that leaves `root`.
fn domain_dir(root: &Path, host: &str) -> Option<PathBuf> {
    let name = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let name = name.to_ascii_lowercase();
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    valid.then(|| root.join(name))
}

async fn answer(root: &Path, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "a mirror serves GET and HEAD only".to_owned(),
        );
    }
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let Some(dir) = domain_dir(root, host) else {
        return plain(
            StatusCode::BAD_REQUEST,
            format!("no mirror for Host `{host}`"),
        );
    };
    let path = match ResourcePath::parse(req.uri().path()) {
        Ok(p) => p,
        Err(why) => return plain(StatusCode::NOT_FOUND, format!("not mirrored: {why}")),
    };
    let file = match LocalFileSystem::new_with_prefix(&dir)
        .and_then(|s| s.path_to_filesystem(&path.key()))
    {
        Ok(f) => f,
        Err(_) => return plain(StatusCode::NOT_FOUND, format!("not mirrored: {host}{path}")),
    };
    match stored(&file).await {
        Ok(Some((head, body_offset, size))) => respond(head, &file, body_offset, size, &req).await,
        Ok(None) => plain(StatusCode::NOT_FOUND, format!("not mirrored: {host}{path}")),
        Err(why) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored copy of {host}{path} unreadable: {why}"),
        ),
    }
}

/// The head, where the body starts, and the body's size.
async fn stored(file: &Path) -> std::io::Result<Option<(StoredHead, u64, u64)>> {
    let f = match tokio::fs::File::open(file).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let total = f.metadata().await?.len();
    let mut reader = BufReader::new(f).take(MAX_HEAD_LINE as u64);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    let head = StoredHead::from_envelope_line(&line)
        .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidData, why))?;
    let offset = line.len() as u64;
    Ok(Some((head, offset, total.saturating_sub(offset))))
}

async fn respond(
    head: StoredHead,
    file: &Path,
    offset: u64,
    size: u64,
    req: &Request<Incoming>,
) -> Response<Body> {
    let not_modified = match (&head.etag, req.headers().get(IF_NONE_MATCH)) {
        (Some(etag), Some(asked)) => asked
            .to_str()
            .is_ok_and(|a| a.split(',').any(|t| t.trim() == etag || t.trim() == "*")),
        _ => false,
    };
    let (status, body): (StatusCode, Body) = if not_modified {
        (
            StatusCode::NOT_MODIFIED,
            Empty::new().map_err(|never| match never {}).boxed(),
        )
    } else if req.method() == Method::HEAD {
        (
            StatusCode::from_u16(head.status).unwrap_or(StatusCode::OK),
            Empty::new().map_err(|never| match never {}).boxed(),
        )
    } else {
        let mut f = match tokio::fs::File::open(file).await {
            Ok(f) => f,
            Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        if let Err(e) = f.seek(SeekFrom::Start(offset)).await {
            return plain(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
        let stream = tokio_util::io::ReaderStream::new(f.take(size)).map_ok(Frame::data);
        (
            StatusCode::from_u16(head.status).unwrap_or(StatusCode::OK),
            StreamBody::new(stream).boxed(),
        )
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let headers = r.headers_mut();
    for (name, value) in head.headers() {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    }
    if status != StatusCode::NOT_MODIFIED {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(size));
    }
    headers.insert(SERVED_BY_HEADER, HeaderValue::from_static("stored copy"));
    r
}
