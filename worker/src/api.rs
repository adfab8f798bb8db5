//! The worker's own status API, for whoever looks after the PC: what it
//! runs, what it has done, a live dashboard, and a way to reconnect.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use tokio::sync::watch;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::status::Status;

/// `status` events go out at most this often, however busy the slots are.
const STATUS_EVERY: Duration = Duration::from_millis(200);
const STATS_EVERY: Duration = Duration::from_secs(1);

const DASHBOARD: &str = include_str!("dashboard.html");

pub fn router(status: Arc<Status>) -> Router {
    Router::new()
        .route("/", get(get_status))
        .route("/stats", get(get_stats))
        .route("/restart", post(restart))
        .route("/events", get(events))
        .route("/dashboard", get(dashboard))
        .with_state(status)
}

/// Serves the API on `addr` in the background and returns the address bound.
/// A worker is still useful without its API, so a taken port only warns.
pub async fn spawn(status: Arc<Status>, addr: SocketAddr) -> Option<SocketAddr> {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!("the status API cannot listen on {addr}: {error}; running without it");
            return None;
        }
    };
    let bound = listener.local_addr().ok()?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router(status)).await {
            tracing::warn!("the status API stopped: {error}");
        }
    });
    tracing::info!(api = %bound, "status API listening");
    Some(bound)
}

async fn get_status(State(status): State<Arc<Status>>) -> impl IntoResponse {
    Json(status.view())
}

async fn get_stats(State(status): State<Arc<Status>>) -> impl IntoResponse {
    Json(status.stats())
}

async fn restart(State(status): State<Arc<Status>>) -> impl IntoResponse {
    tracing::info!("restart asked for through the status API");
    status.request_restart();
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "restarting": true })),
    )
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn events(
    State(status): State<Arc<Status>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    Sse::new(event_stream(status)).keep_alive(KeepAlive::default())
}

struct Feed {
    status: Arc<Status>,
    changes: watch::Receiver<u64>,
    /// A change not yet sent (it waits for `next_status`).
    pending: bool,
    next_status: Instant,
    stats: Interval,
}

/// `status` at once and after every change (at most every [`STATUS_EVERY`]),
/// `stats` at once and every [`STATS_EVERY`].
fn event_stream(status: Arc<Status>) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut stats = tokio::time::interval(STATS_EVERY);
    stats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let feed = Feed {
        changes: status.subscribe(),
        status,
        pending: true,
        next_status: Instant::now(),
        stats,
    };
    futures_util::stream::unfold(feed, |mut feed| async move {
        loop {
            tokio::select! {
                changed = feed.changes.changed(), if !feed.pending => {
                    if changed.is_err() {
                        return None;
                    }
                    feed.pending = true;
                }
                _ = tokio::time::sleep_until(feed.next_status), if feed.pending => {
                    feed.pending = false;
                    feed.changes.borrow_and_update();
                    feed.next_status = Instant::now() + STATUS_EVERY;
                    let event = json_event("status", &feed.status.view());
                    return Some((Ok(event), feed));
                }
                _ = feed.stats.tick() => {
                    let event = json_event("stats", &feed.status.stats());
                    return Some((Ok(event), feed));
                }
            }
        }
    })
}

fn json_event(name: &str, value: &impl serde::Serialize) -> Event {
    let data = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
    Event::default().event(name).data(data)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use futures_util::StreamExt;
    use tower::ServiceExt;
    use wasmgrid_protocol::{CacheSource, FailureKind};

    use super::*;
    use crate::status::tests::{report, status};

    const PATIENCE: Duration = Duration::from_secs(10);

    async fn call(router: Router, method: &str, uri: &str) -> (StatusCode, String, String) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        let code = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            code,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    async fn get_json(router: Router, uri: &str) -> serde_json::Value {
        let (code, content_type, body) = call(router, "GET", uri).await;
        assert_eq!(code, StatusCode::OK);
        assert!(content_type.starts_with("application/json"));
        serde_json::from_str(&body).unwrap()
    }

    #[tokio::test]
    async fn status_has_its_shape() {
        let status = status();
        let json = get_json(router(status.clone()), "/").await;
        assert_eq!(json["worker_id"], serde_json::Value::Null);
        assert_eq!(json["name"], "test");
        assert_eq!(json["foreman"], "127.0.0.1:9000");
        assert_eq!(json["connection"], "connecting");
        assert_eq!(json["status"], "starting");
        assert_eq!(json["slots"], 2);
        assert_eq!(json["cpu_limit_percent"], 50);
        assert_eq!(json["running"], serde_json::json!([]));

        status.joined(4);
        status.started(9);
        let json = get_json(router(status), "/").await;
        assert_eq!(json["worker_id"], 4);
        assert_eq!(json["connection"], "connected");
        assert_eq!(json["running"][0]["attempt"], 9);
        assert!(json["running"][0]["started_ms"].as_u64().unwrap() > 0);
        assert!(json["running"][0]["elapsed_ms"].is_u64());
    }

    #[tokio::test]
    async fn stats_count_the_reports() {
        let status = status();
        status.module_fetched();
        status.finished(1, &report(Ok("1"), CacheSource::Compiled));
        status.finished(2, &report(Err(FailureKind::OutOfFuel), CacheSource::Memory));
        let json = get_json(router(status), "/stats").await;
        assert_eq!(json["tasks_completed"], 1);
        assert_eq!(json["tasks_failed"], 1);
        assert_eq!(
            json["failures_by_kind"],
            serde_json::json!({ "OutOfFuel": 1 })
        );
        assert_eq!(json["total_execution_us"], 60);
        assert_eq!(json["fuel_used"], 200);
        assert_eq!(json["cache_hits"], 1);
        assert_eq!(json["cache_misses"], 1);
        assert_eq!(json["modules_fetched"], 1);
        assert!(json["uptime_secs"].is_u64());
    }

    #[tokio::test]
    async fn restart_signals_the_join_loop() {
        let status = status();
        let (code, _, body) = call(router(status.clone()), "POST", "/restart").await;
        assert_eq!(code, StatusCode::ACCEPTED);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json, serde_json::json!({ "restarting": true }));
        tokio::time::timeout(PATIENCE, status.restart_requested())
            .await
            .expect("the restart was signalled");
        let (code, _, _) = call(router(status), "GET", "/restart").await;
        assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn events_stream_status_then_changes() {
        let status = status();
        let request = Request::builder()
            .uri("/events")
            .body(Body::empty())
            .unwrap();
        let response = router(status.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().get("content-type").unwrap(),
            "text/event-stream"
        );
        let mut body = response.into_body().into_data_stream();
        let mut text = String::new();
        let mut read_until = async |needle: &str, text: &mut String| {
            while !text.contains(needle) {
                let chunk = tokio::time::timeout(PATIENCE, body.next())
                    .await
                    .expect("an event in time")
                    .expect("the stream goes on")
                    .unwrap();
                text.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        };
        read_until("event: status", &mut text).await;
        read_until("event: stats", &mut text).await;
        assert!(text.contains("\"connection\":\"connecting\""), "{text}");
        status.started(77);
        read_until("\"attempt\":77", &mut text).await;
    }

    #[tokio::test]
    async fn status_events_are_throttled() {
        let status = status();
        let mut stream = Box::pin(event_stream(status.clone()));
        let started = Instant::now();
        // Two changes in a burst: the first event, then one more no sooner than the throttle allows.
        let mut statuses = 0;
        while statuses < 2 {
            status.started(statuses);
            let next = tokio::time::timeout(PATIENCE, stream.next()).await;
            if let Ok(Some(Ok(event))) = next {
                if format!("{event:?}").contains("status") {
                    statuses += 1;
                }
            }
        }
        assert!(started.elapsed() >= STATUS_EVERY);
    }

    #[tokio::test]
    async fn the_dashboard_is_a_page_that_listens_to_events() {
        let (code, content_type, body) = call(router(status()), "GET", "/dashboard").await;
        assert_eq!(code, StatusCode::OK);
        assert!(content_type.starts_with("text/html"));
        assert!(body.starts_with("<!doctype html>"));
        assert!(body.contains("EventSource(\"/events\")"));
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "no CDN"
        );
    }

    #[tokio::test]
    async fn a_taken_port_leaves_the_worker_without_an_api() {
        let first = spawn(status(), SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("an ephemeral port");
        assert_ne!(first.port(), 0);
        assert_eq!(spawn(status(), first).await, None);
    }
}
