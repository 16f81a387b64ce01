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
use hyper_util::rt::{TokioIo, TokioTimer};
use object_store::local::LocalFileSystem;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncSeekExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

type Body = BoxBody<Bytes, std::io::Error>;

/// Names the answer as the mirror's: a viewer (and a test) can tell the
/// secondary served it.
pub const SERVED_BY_HEADER: &str = "x-origin-policy-mirror";

/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 4096;
/// A client gets this long to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves until the task is dropped; one task per connection.
pub async fn serve_stores(root: PathBuf, listener: TcpListener) {
    let root = Arc::new(root);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors, or a connection aborted before it was
            // accepted: the server goes on.
            Err(e) => {
                eprintln!("mirror-serve: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let root = root.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let root = root.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&root, req).await) }
            });
            // A viewer hanging up mid-body is not an error of the store.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
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
        Ok(Some((head, body, size))) => respond(head, body, size, &req),
        Ok(None) => plain(StatusCode::NOT_FOUND, format!("not mirrored: {host}{path}")),
        Err(why) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored copy of {host}{path} unreadable: {why}"),
        ),
    }
}

/// The head, the open object positioned at its body, and the body's size.
/// One open file for both: an object replaced meanwhile (a rename) is
/// served whole, old or new, never the old head with the new body.
async fn stored(file: &Path) -> std::io::Result<Option<(StoredHead, tokio::fs::File, u64)>> {
    let f = match tokio::fs::File::open(file).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = f.metadata().await?;
    if !meta.is_file() {
        return Ok(None);
    }
    let mut reader = BufReader::new(f).take(MAX_HEAD_LINE as u64);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    let head = StoredHead::from_envelope_line(&line)
        .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidData, why))?;
    let offset = line.len() as u64;
    let mut f = reader.into_inner().into_inner();
    f.seek(SeekFrom::Start(offset)).await?;
    Ok(Some((head, f, meta.len().saturating_sub(offset))))
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn respond(
    head: StoredHead,
    body: tokio::fs::File,
    size: u64,
    req: &Request<Incoming>,
) -> Response<Body> {
    let not_modified = match (head.get("etag"), req.headers().get(IF_NONE_MATCH)) {
        (Some(etag), Some(asked)) => asked
            .to_str()
            .is_ok_and(|a| a.split(',').any(|t| t.trim() == etag || t.trim() == "*")),
        _ => false,
    };
    let stored_status = StatusCode::from_u16(head.status).unwrap_or(StatusCode::OK);
    let (status, body): (StatusCode, Body) = if not_modified {
        (StatusCode::NOT_MODIFIED, empty())
    } else if req.method() == Method::HEAD {
        (stored_status, empty())
    } else {
        let stream = tokio_util::io::ReaderStream::new(body.take(size)).map_ok(Frame::data);
        (stored_status, StreamBody::new(stream).boxed())
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
