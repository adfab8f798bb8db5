//! Who may call the API: tokens for changes everywhere, for reads beyond loopback.

use super::tests::{app_state, call, fixture_token, send};
use super::*;
use crate::model::Scheduler;
use crate::store::TokenKind;
use axum::body::Body;
use axum::http::Request;

fn bearer(request: axum::http::request::Builder, token: &str) -> axum::http::request::Builder {
    request.header("authorization", format!("Bearer {token}"))
}

/// The same state with other access rules.
fn with_security(
    state: &ApiState,
    protect_reads: bool,
    cors_origin: Option<axum::http::HeaderValue>,
) -> Arc<ApiState> {
    Arc::new(ApiState {
        security: Security {
            tokens: state.security.tokens.clone(),
            fingerprint: String::new(),
            protect_reads,
            cors_origin,
        },
        store: state.store.clone(),
        driver: state.driver.clone(),
        validator: state.validator.clone(),
        max_upload_bytes: state.max_upload_bytes,
        submit_limits: state.submit_limits,
        validated: Default::default(),
        default_scheduler: state.default_scheduler,
        heartbeat_timeout: state.heartbeat_timeout,
        output_limits: state.output_limits,
    })
}

/// A request for a token of `kind`; a client token is an admin's.
fn create(kind: &str) -> Body {
    let role = if kind == "client" {
        r#", "role": "admin""#
    } else {
        ""
    };
    Body::from(format!(r#"{{"kind": "{kind}", "name": "t"{role}}}"#))
}

/// Sends `request` with `token` as its bearer.
async fn send_as(
    app: &Router,
    request: axum::http::request::Builder,
    token: &str,
    body: Body,
) -> (StatusCode, serde_json::Value) {
    send(app.clone(), bearer(request, token).body(body).unwrap()).await
}

/// Asks for a new token of `kind`, presenting `credential` if any.
async fn make_token(
    app: &Router,
    kind: &str,
    credential: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let request = Request::post("/api/tokens");
    match credential {
        Some(token) => send_as(app, request, token, create(kind)).await,
        None => send(app.clone(), request.body(create(kind)).unwrap()).await,
    }
}

#[tokio::test]
async fn changes_need_a_client_token_and_the_reason_is_named() {
    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let app = router(state.clone());

    let (status, json) = make_token(&app, "client", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{json}");
    assert_eq!(json["error"]["code"], "unauthorized");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer"),
        "{json}"
    );
    // Reads on loopback need none.
    let (status, _) = send(
        app.clone(),
        Request::get("/api/jobs").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let admin = fixture_token();
    let (status, made) = make_token(&app, "client", Some(admin.as_str())).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let token = made["token"].as_str().unwrap().to_owned();
    let id = made["id"].as_u64().unwrap();
    assert!(token.starts_with(&format!("wgc_{id}_")), "{made}");

    let (status, list) = send_as(&app, Request::get("/api/tokens"), &token, Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["fingerprint"], "ab".repeat(32));
    assert!(
        !list.to_string().contains(&token[token.len() - 32..]),
        "no secrets: {list}"
    );
    assert_eq!(list["tokens"].as_array().unwrap().len(), 2);

    let (status, revoked) = send_as(
        &app,
        Request::post(format!("/api/tokens/{id}/revoke")),
        &admin,
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert!(revoked["revoked_at_ms"].is_u64());
    let (status, json) = send_as(
        &app,
        Request::post("/api/workers/1/drain"),
        &token,
        Body::from("{}"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        json["error"]["message"],
        format!("client token {id} was revoked")
    );

    let (status, json) = make_token(&app, "client", Some("wgc_1_0123")).await;
    assert_eq!(
        (status, json["error"]["message"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid client token"))
    );
}

#[tokio::test]
async fn a_join_token_is_no_client_token_and_expired_ones_are_refused() {
    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let app = router(state.clone());
    let (status, made) = call(
        app.clone(),
        Request::post("/api/tokens").body(create("worker")).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let join = made["token"].as_str().unwrap();
    // One string to paste: the secret and the fingerprint to pin.
    assert!(join.ends_with(&format!(":{}", "ab".repeat(32))), "{join}");
    let (status, json) = make_token(&app, "client", Some(join)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        json["error"]["message"],
        format!("token {} is a worker token, not a client token", made["id"])
            .replace("worker token", "join token")
    );

    let expired = state
        .security
        .tokens
        .issue(TokenKind::Client, "old", Some(1_000))
        .unwrap();
    let (status, json) = make_token(&app, "client", Some(expired.token.as_str())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        json["error"]["message"],
        format!(
            "client token {} expired at 1970-01-01T00:00:01Z",
            expired.row.id
        )
    );
}

#[tokio::test]
async fn beyond_loopback_reads_need_a_token_too_but_the_dashboard_does_not() {
    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let state = with_security(&state, true, None);
    let app = router(state);
    for path in ["/api/jobs", "/api/workers", "/metrics", "/api/events"] {
        let (status, json) =
            send(app.clone(), Request::get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {json}");
    }
    let token = fixture_token();
    let (status, _) = send_as(&app, Request::get("/api/jobs"), &token, Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    // EventSource cannot send headers: streams take the token in the query.
    let response = tower::ServiceExt::oneshot(
        app.clone(),
        Request::get(format!("/api/events?access_token={token}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // ...and only streams.
    let (status, _) = send(
        app.clone(),
        Request::get(format!("/api/jobs?access_token={token}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let response = tower::ServiceExt::oneshot(app, Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}

#[tokio::test]
async fn a_job_remembers_the_token_that_submitted_it() {
    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let module = super::tests::known_module(&state);
    let body = serde_json::json!({ "module_sha256": module, "args": [[1]] });
    let (status, json) = call(
        router(state.clone()),
        Request::post("/api/jobs")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    let expected = crate::tokens::parse(&fixture_token()).unwrap().1;
    let job = json["id"].as_u64().unwrap();
    assert_eq!(state.store.job_token(job).unwrap(), Some(expected));
}

#[tokio::test]
async fn cors_is_off_unless_one_origin_is_named() {
    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let preflight = || {
        Request::options("/api/jobs/1/cancel")
            .header("origin", "http://dash.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization")
            .body(Body::empty())
            .unwrap()
    };
    let response = tower::ServiceExt::oneshot(router(state.clone()), preflight())
        .await
        .unwrap();
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    let named = with_security(
        &state,
        false,
        Some(axum::http::HeaderValue::from_static("http://dash.example")),
    );
    let response = tower::ServiceExt::oneshot(router(named.clone()), preflight())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://dash.example"
    );
    assert!(response.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));
    // The origin may ask, but still needs a token to act.
    let (status, _) = send(
        router(named.clone()),
        Request::post("/api/jobs/1/cancel")
            .header("origin", "http://dash.example")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let response = tower::ServiceExt::oneshot(
        router(named),
        Request::get("/api/jobs")
            .header("origin", "http://other.example")
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}

#[tokio::test]
async fn roles_limit_what_a_client_token_may_do() {
    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let module = super::tests::known_module(&state);
    let app = router(state.clone());
    let admin = fixture_token();
    let made = |body: serde_json::Value| {
        let app = app.clone();
        let admin = admin.clone();
        async move {
            let request = Request::post("/api/tokens").header("content-type", "application/json");
            send_as(&app, request, &admin, Body::from(body.to_string())).await
        }
    };
    let client = |role: Option<&str>| made(serde_json::json!({ "kind": "client", "role": role }));
    let (status, user) = client(None).await;
    assert_eq!(
        (status, user["role"].as_str()),
        (StatusCode::CREATED, Some("user")),
        "{user}"
    );
    let (_, reader) = client(Some("read")).await;
    assert_eq!(reader["role"], "read", "{reader}");
    let user_id = user["id"].clone();
    let (user, reader) = (
        user["token"].as_str().unwrap().to_owned(),
        reader["token"].as_str().unwrap().to_owned(),
    );
    // Each caller can ask who it is; without a token, nobody.
    let (status, me) = send_as(&app, Request::get("/api/whoami"), &user, Body::empty()).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(
        (&me["token_id"], &me["role"]),
        (&user_id, &"user".into()),
        "{me}"
    );
    let (_, nobody) = send(
        app.clone(),
        Request::get("/api/whoami").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        (&nobody["token_id"], &nobody["role"]),
        (&serde_json::Value::Null, &serde_json::Value::Null)
    );
    for (body, expected) in [
        (
            serde_json::json!({ "kind": "client", "role": "root" }),
            "unknown token role \"root\"",
        ),
        (
            serde_json::json!({ "kind": "worker", "role": "read" }),
            "a worker token has no role",
        ),
    ] {
        let (status, json) = made(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
        assert!(
            json["error"]["message"]
                .as_str()
                .unwrap()
                .contains(expected),
            "{json}"
        );
    }

    let submit = |token: String| {
        let app = app.clone();
        let body = serde_json::json!({ "module_sha256": module, "args": [[1]] });
        async move {
            let request = Request::post("/api/jobs").header("content-type", "application/json");
            send_as(&app, request, &token, Body::from(body.to_string())).await
        }
    };
    let cancel = |token: String, job: &serde_json::Value| {
        let app = app.clone();
        let uri = format!("/api/jobs/{}/cancel", job["id"]);
        async move { send_as(&app, Request::post(uri), &token, Body::empty()).await }
    };
    let forbidden = |(status, json): (StatusCode, serde_json::Value), why: &str| {
        assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
        assert_eq!(json["error"]["code"], "forbidden", "{json}");
        assert!(
            json["error"]["message"].as_str().unwrap().contains(why),
            "{json}"
        );
    };

    // A reader reads, and changes nothing.
    forbidden(submit(reader.clone()).await, "has the read role");
    let (status, _) = send_as(&app, Request::get("/api/jobs"), &reader, Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    // A user submits, and cancels its own jobs only.
    let (status, mine) = submit(user.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{mine}");
    let uri = format!("/api/jobs/{}", mine["id"]);
    let (_, row) = send_as(&app, Request::get(uri), &reader, Body::empty()).await;
    assert_eq!(
        row["token_id"], user_id,
        "a job names the token that submitted it: {row}"
    );
    let (status, theirs) = submit(admin.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{theirs}");
    forbidden(
        cancel(user.clone(), &theirs).await,
        "cancels only its own jobs",
    );
    forbidden(cancel(reader.clone(), &mine).await, "has the read role");
    let (status, json) = cancel(user.clone(), &mine).await;
    assert_eq!(
        (status, &json["cancelled"]),
        (StatusCode::OK, &true.into()),
        "{json}"
    );
    // Tokens and draining are an admin's.
    let admins_only = "needs an admin token";
    forbidden(
        send_as(&app, Request::get("/api/tokens"), &user, Body::empty()).await,
        admins_only,
    );
    forbidden(
        send_as(&app, Request::post("/api/tokens"), &user, create("client")).await,
        admins_only,
    );
    forbidden(
        send_as(
            &app,
            Request::post("/api/workers/1/drain"),
            &user,
            Body::empty(),
        )
        .await,
        admins_only,
    );
    // An admin does all of it.
    let (status, json) = cancel(admin.clone(), &theirs).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let (status, listed) = send_as(&app, Request::get("/api/tokens"), &admin, Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    let roles: Vec<_> = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["role"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(roles, ["admin", "user", "read"], "{listed}");
}

#[tokio::test]
async fn only_a_finished_job_is_deleted_and_only_by_who_may_change_it() {
    let (_dir, state) = app_state(1 << 20, Scheduler::Fifo).await;
    let module = super::tests::known_module(&state);
    let app = router(state.clone());
    let admin = fixture_token();
    let mut tokens = Vec::new();
    for role in ["user", "read"] {
        let body = serde_json::json!({ "kind": "client", "role": role }).to_string();
        let request = Request::post("/api/tokens").header("content-type", "application/json");
        let (status, made) = send_as(&app, request, &admin, Body::from(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{made}");
        tokens.push(made["token"].as_str().unwrap().to_owned());
    }
    let (user, reader) = (&tokens[0], &tokens[1]);
    let submit = |token: &str| {
        let (app, token) = (app.clone(), token.to_owned());
        let body = serde_json::json!({ "module_sha256": module, "args": [[1], [2]] });
        async move {
            let request = Request::post("/api/jobs").header("content-type", "application/json");
            let (status, json) = send_as(&app, request, &token, Body::from(body.to_string())).await;
            assert_eq!(status, StatusCode::CREATED, "{json}");
            json["id"].as_u64().unwrap()
        }
    };
    let act = |method: &str, token: &str, path: String| {
        let (app, token) = (app.clone(), token.to_owned());
        let request = Request::builder().method(method).uri(path);
        async move { send_as(&app, request, &token, Body::empty()).await }
    };
    let refused = |(status, json): (StatusCode, serde_json::Value), code: StatusCode, why: &str| {
        assert_eq!(status, code, "{json}");
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{json}");
    };
    let (mine, theirs) = (submit(user).await, submit(&admin).await);
    // No worker has joined: both are queued, and must be cancelled first.
    refused(
        act("DELETE", user, format!("/api/jobs/{mine}")).await,
        StatusCode::CONFLICT,
        &format!("job {mine} is queued: only a finished job can be deleted; cancel it first"),
    );
    for job in [mine, theirs] {
        let (status, json) = act("POST", &admin, format!("/api/jobs/{job}/cancel")).await;
        assert_eq!(status, StatusCode::OK, "{json}");
    }
    refused(
        act("DELETE", user, format!("/api/jobs/{theirs}")).await,
        StatusCode::FORBIDDEN,
        "a user token deletes only its own jobs",
    );
    refused(
        act("DELETE", reader, format!("/api/jobs/{mine}")).await,
        StatusCode::FORBIDDEN,
        "has the read role",
    );
    for (token, job) in [(user, mine), (&admin, theirs)] {
        let (status, json) = act("DELETE", token, format!("/api/jobs/{job}")).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!(
            (&json["deleted"], &json["tasks"]),
            (&true.into(), &2.into())
        );
        refused(
            act("GET", reader, format!("/api/jobs/{job}")).await,
            StatusCode::NOT_FOUND,
            &format!("no job with id {job}"),
        );
    }
    refused(
        act("DELETE", &admin, format!("/api/jobs/{mine}")).await,
        StatusCode::NOT_FOUND,
        &format!("no job with id {mine}"),
    );
}
