//! The admin listener's routes (plain HTTP, meant for a private address: it has no
//! authentication, like every exporter Prometheus scrapes):
//!
//! - `GET /metrics`: Prometheus text format 0.0.4 ([`super::Metrics`]).
//! - `GET /livez`: 200 `live` while every worker is live, else 503 and the reason.
//! - `GET /readyz`: 200 `ready` when the node should get traffic, else 503 and every reason,
//!   one per line.
//! - `GET /debug/channels`: JSON, every channel each worker carries (parents, substreams,
//!   subscribers, window, counters): the per-channel detail metrics leave out.
//! - `broadcast`'s only: `GET /admin/metadata?mode=updinfo&song=…` (or SHOUTcast's
//!   `/admin.cgi?pass=…&mode=updinfo&song=…`), the song title, as the Icecast input takes it
//!   ([`crate::app::icecast`]), for inputs with no port of their own to take it on (stdin, a
//!   file, TCP, UDP). The one route that changes anything, so it wants the source password
//!   whatever the listener's address (`403` when the broadcast has none).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Response, StatusCode};
use serde_json::json;

use crate::app::http::{self, HttpLimits, HttpServer, HttpStats};
use crate::app::icecast::{self, TitleGate};

use super::{Metrics, Snapshot, Watched, health};

/// A source's title route: where titles go, and the password they must give.
#[derive(Clone, Debug)]
pub struct TitleRoute {
    /// The source password (`--source-password`); without one, every update is refused.
    pub password: Option<String>,
    /// The source loop's inbox of titles.
    pub titles: SyncSender<String>,
}

/// Serves the admin routes on `addr` (with the title route if `titles`); returns the bound
/// address and the listener's counters.
pub fn start(
    server: &HttpServer,
    addr: SocketAddr,
    watched: Watched,
    metrics: Arc<Metrics>,
    titles: Option<TitleRoute>,
) -> std::io::Result<(SocketAddr, Arc<HttpStats>)> {
    let listener = crate::app::accept::listen(addr)?;
    let bound = listener.local_addr()?;
    let handler: http::Handler = Arc::new(move |req, remote| {
        let watched = watched.clone();
        let metrics = Arc::clone(&metrics);
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        if let Some(route) = &titles
            && icecast::is_metadata(&req)
        {
            let answer = match &route.password {
                Some(password) => {
                    let gate = TitleGate {
                        password,
                        mount: None,
                    };
                    icecast::metadata(&req, remote, gate, &route.titles)
                }
                None => {
                    tracing::warn!(%remote, "title update refused: the broadcast has no source password");
                    http::text(
                        StatusCode::FORBIDDEN,
                        "title updates need the source password: start broadcast with \
                         --source-password (or GRIDCAST_SOURCE_PASSWORD)\n",
                    )
                }
            };
            return Box::pin(async move { answer });
        }
        Box::pin(async move {
            if method != Method::GET && method != Method::HEAD {
                return http::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
            }
            route(&path, &watched, &metrics).await
        })
    });
    let stats = server.serve(listener, handler, HttpLimits::default())?;
    Ok((bound, stats))
}

async fn route(path: &str, watched: &Watched, metrics: &Metrics) -> Response<http::Body> {
    #[allow(clippy::disallowed_methods)] // health compares with the clock
    let now = std::time::Instant::now();
    match path {
        "/metrics" => {
            let snapshot = watched.snapshot().await;
            #[allow(clippy::disallowed_methods)] // a scrape reads the wall clock once
            let wall = std::time::SystemTime::now();
            let body = metrics.render(&snapshot, wall, now);
            let mut response = http::text(StatusCode::OK, body);
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/livez" => {
            let pulses: Vec<_> = watched.pulses.iter().map(|p| p.read()).collect();
            match health::liveness(&pulses, now) {
                Ok(()) => http::text(StatusCode::OK, "live\n"),
                Err(why) => http::text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            }
        }
        "/readyz" => {
            let snapshot = watched.snapshot().await;
            match health::readiness(&snapshot, now) {
                Ok(()) => http::text(StatusCode::OK, "ready\n"),
                Err(why) => http::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{}\n", why.join("\n")),
                ),
            }
        }
        "/debug/channels" => {
            let snapshot = watched.snapshot().await;
            let mut response = http::text(StatusCode::OK, channels_json(&snapshot));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        _ => http::text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /livez, /readyz, /debug/channels\n",
        ),
    }
}

fn channels_json(snapshot: &Snapshot) -> String {
    let workers: Vec<_> = snapshot
        .reports
        .iter()
        .enumerate()
        .map(|(w, r)| match r {
            None => json!({ "worker": w, "answered": false }),
            Some(r) => {
                let channels: Vec<_> = r
                    .channels
                    .iter()
                    .map(|c| {
                        json!({
                            "channel": c.channel.to_string(),
                            "mode": format!("{:?}", c.mode).to_lowercase(),
                            "parents": c.parents,
                            "drawn_from": c.drawn_from.iter().map(|p| json!({
                                "addr": p.addr.to_string(),
                                "substreams": p.substreams,
                                "min_rtt_ms": p.min_rtt.map(|r| r.as_secs_f64() * 1000.0),
                            })).collect::<Vec<_>>(),
                            "substreams_held": c.substreams_held,
                            "substreams_needed": c.needed,
                            "delivering": c.delivering,
                            "subscribers": c.subscribers,
                            "window": c.window.map(|(a, b)| json!({ "oldest": a, "newest": b })),
                            "buffer_seconds": c.buffer.map(|b| b.as_secs_f64()),
                            "title": c.title,
                            "chunks_played": c.stats.chunks_played,
                            "chunks_skipped": c.stats.chunks_skipped,
                            "shards_in": c.stats.shards_in,
                            "verify_failures": c.stats.verify_failures,
                            "regenerated": c.stats.regenerated,
                            "startup_seconds": c.stats.startup.map(|s| s.as_secs_f64()),
                        })
                    })
                    .collect();
                json!({
                    "worker": w,
                    "answered": true,
                    "draining": r.draining,
                    "connections": {
                        "peer": r.connections.peer,
                        "supernode": r.connections.supernode,
                        "source": r.connections.source,
                        "unknown": r.connections.unknown,
                    },
                    "channels": channels,
                })
            }
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&json!({ "workers": workers }))
        .unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    text
}
