use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use tower::ServiceExt;

use super::*;

async fn get(path: &str) -> (StatusCode, String, String) {
    let response = router::<()>()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let mime = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, mime, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn the_page_is_html_at_the_root_and_at_a_job() {
    for path in ["/", "/jobs/7"] {
        let (status, mime, body) = get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(mime, "text/html; charset=utf-8", "{path}");
        assert!(body.starts_with("<!doctype html>"), "{path}");
        assert!(body.contains("/dashboard/main.js"), "{path}");
    }
}

#[tokio::test]
async fn assets_have_their_mime_types() {
    for (file, mime) in [
        ("style.css", "text/css; charset=utf-8"),
        ("main.js", "text/javascript; charset=utf-8"),
        ("charts.js", "text/javascript; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let (status, got, body) = get(&format!("/dashboard/{file}")).await;
        assert_eq!(status, StatusCode::OK, "{file}");
        assert_eq!(got, mime, "{file}");
        assert!(!body.is_empty(), "{file}");
    }
    assert_eq!(get("/dashboard/nope.js").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn every_module_the_page_imports_is_served() {
    let mut sources: Vec<&str> = vec![INDEX_HTML];
    sources.extend(ASSETS.iter().map(|(_, _, body)| *body));
    for source in sources {
        for part in source.split("\"./").skip(1) {
            let name = &part[..part.find('"').unwrap()];
            assert!(
                ASSETS.iter().any(|(file, _, _)| *file == name),
                "imported but not served: {name}"
            );
        }
    }
}
