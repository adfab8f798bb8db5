//! The web dashboard (issue #5): one page, served from assets compiled into
//! the binary, that follows workers and jobs live through the REST API.
//!
//! `GET /` and `GET /jobs/{id}` serve the same page (the script routes on the
//! path); `GET /dashboard/{file}` serves its scripts and style sheet.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

#[cfg(test)]
mod tests;

/// The page itself.
const INDEX_HTML: &str = include_str!("assets/index.html");

/// Every other asset: name under `/dashboard/`, MIME type, contents.
const ASSETS: &[(&str, &str, &str)] = &[
    ("style.css", CSS, include_str!("assets/style.css")),
    ("main.js", JS, include_str!("assets/main.js")),
    ("api.js", JS, include_str!("assets/api.js")),
    ("format.js", JS, include_str!("assets/format.js")),
    ("charts.js", JS, include_str!("assets/charts.js")),
    ("overview.js", JS, include_str!("assets/overview.js")),
    ("job.js", JS, include_str!("assets/job.js")),
    ("picture.js", JS, include_str!("assets/picture.js")),
    ("favicon.svg", SVG, include_str!("assets/favicon.svg")),
];

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// The dashboard's routes; stateless, so it merges into any router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/jobs/{id}", get(index))
        .route("/dashboard/{file}", get(asset))
}

async fn index() -> Response {
    serve(HTML, INDEX_HTML)
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, mime, body)) => serve(mime, body),
        None => (StatusCode::NOT_FOUND, "no such dashboard file").into_response(),
    }
}

/// Assets change with the binary: let the browser revalidate each load.
fn serve(mime: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
