//! A minimal HTTP/1.1 server for the metrics: one connection at a time,
//! requests bounded in size and time, `GET /metrics` answered and
//! everything else refused. Enough for a Prometheus scraper; nothing a
//! client sends can hold it longer than the timeouts.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// Largest request head read.
const MAX_REQUEST: usize = 8 << 10;
/// How long a client may take to send its request or read the answer.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a request asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    NotFound,
    BadMethod,
    BadRequest,
}

/// Routes a request head.
pub fn route(head: &[u8]) -> Route {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Route::BadRequest;
    };
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    if method != "GET" {
        return Route::BadMethod;
    }
    let path = target.split('?').next().unwrap_or("");
    if path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

/// Reads a request head: up to the blank line, at most [`MAX_REQUEST`].
fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

fn answer(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

/// Serves one connection: `render` makes the metrics' text.
fn serve_one(mut stream: TcpStream, render: &dyn Fn() -> String) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let text = "text/plain; charset=utf-8";
    match route(&head) {
        Route::Metrics => answer(
            &mut stream,
            "200 OK",
            crate::metrics::CONTENT_TYPE,
            &render(),
        ),
        Route::NotFound => answer(
            &mut stream,
            "404 Not Found",
            text,
            "husk metrics: GET /metrics\n",
        ),
        Route::BadMethod => answer(&mut stream, "405 Method Not Allowed", text, "GET only\n"),
        Route::BadRequest => answer(&mut stream, "400 Bad Request", text, "bad request\n"),
    }
}

/// Binds `addr`.
pub fn bind(addr: &str) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr).map_err(|source| HttpError::Bind {
        addr: addr.to_string(),
        source,
    })
}

/// Serves `listener` forever, one connection at a time; a failed
/// connection is logged and the next one served.
pub fn serve(listener: &TcpListener, render: &dyn Fn() -> String) {
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                if let Err(e) = serve_one(s, render) {
                    eprintln!("husk metrics: a client: {e}");
                }
            }
            Err(e) => eprintln!("husk metrics: accept: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"\xff\xfe"), Route::BadRequest);
        assert_eq!(route(b""), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY\r\n\r\n"), Route::BadRequest);
    }

    #[test]
    fn a_scrape_gets_the_text_and_a_silent_client_is_dropped() {
        let listener = bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || serve(&listener, &|| "husk_sandboxes 0\n".to_string()));
        // A client that connects and says nothing holds the server at most
        // the timeout; one sending garbage is answered 400.
        let _silent = TcpStream::connect(addr).unwrap();
        let mut bad = TcpStream::connect(addr).unwrap();
        bad.write_all(&[b'x'; MAX_REQUEST * 2]).unwrap_or(());
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.contains("version=0.0.4"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nhusk_sandboxes 0\n"), "{reply}");
        let mut reply = String::new();
        bad.read_to_string(&mut reply).unwrap_or(0);
        assert!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 400"),
            "{reply}"
        );
    }
}
