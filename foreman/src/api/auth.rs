//! Who may call: a bearer client token for every mutating call, and for
//! every data read (`/api/*`, `/metrics`) when the API listens beyond
//! loopback; `/api/tokens` always. The dashboard's static files stay public: they hold no data.
//! Event streams (EventSource sends no headers) may carry the token as
//! `?access_token=` instead.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiState};
use crate::store::{TokenKind, TokenRole};

/// The client token a request came with, for handlers that record or
/// limit by caller (jobs remember the token that submitted them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub token_id: u64,
    pub role: TokenRole,
}

impl Caller {
    /// Why this caller may not change a job that `owner` submitted, if it
    /// may not; `does` names the change ("cancels", "deletes").
    pub fn may_not_touch(&self, job: u64, owner: Option<u64>, does: &str) -> Option<String> {
        (self.role == TokenRole::User && owner != Some(self.token_id)).then(|| {
            format!(
                "job {job} was not submitted with token {}: a user token {does} only its own jobs",
                self.token_id
            )
        })
    }
}

/// Why a token with `role` may not make this call, if it may not.
fn not_allowed(id: u64, role: TokenRole, mutating: bool, admin_only: bool) -> Option<String> {
    match role {
        TokenRole::Admin => None,
        _ if admin_only => Some(format!(
            "token {id} has the {} role: managing tokens and draining workers needs an admin token",
            role.as_str()
        )),
        TokenRole::Read if mutating => Some(format!(
            "token {id} has the read role: it may not change anything"
        )),
        TokenRole::User | TokenRole::Read => None,
    }
}

/// The middleware: refuses with 401 naming why, or passes the request on
/// with its [`Caller`] when a token was presented.
pub async fn require_token(
    State(state): State<Arc<ApiState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path();
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let data = path.starts_with("/api/") || path == "/metrics";
    // Token administration is never open, even to reads on loopback.
    let admin = path == "/api/tokens" || path.starts_with("/api/tokens/");
    let admin_only = admin || (path.starts_with("/api/workers/") && path.ends_with("/drain"));
    let needed = mutating || admin || (state.security.protect_reads && data);
    let presented = bearer(&request).or_else(|| {
        // Only streams: a token in a URL ends up in logs and histories.
        (method == Method::GET && path.ends_with("/events"))
            .then(|| access_token(request.uri().query()))
            .flatten()
    });
    let Some(presented) = presented else {
        if needed {
            return unauthorized(
                "this call needs a client token: send `Authorization: Bearer wgc_…` \
                 (foreman token create --kind client, or the foreman's client-token file)",
            );
        }
        return next.run(request).await;
    };
    // Tokens seen before are checked in memory, without a trip to SQLite.
    let checked = match state
        .security
        .tokens
        .check_known(&presented, TokenKind::Client)
    {
        Some(checked) => Ok(Ok(checked)),
        None => {
            let tokens = state.security.tokens.clone();
            tokio::task::spawn_blocking(move || tokens.check(&presented, TokenKind::Client)).await
        }
    };
    match checked {
        Ok(Ok(Ok(row))) => {
            let role = row.role.unwrap_or(TokenRole::Read);
            if let Some(why) = not_allowed(row.id, role, mutating, admin_only) {
                return ApiError::new(StatusCode::FORBIDDEN, "forbidden", why).into_response();
            }
            let caller = Caller {
                token_id: row.id,
                role,
            };
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        // A token that is presented must be good, even where none is needed.
        Ok(Ok(Err(refusal))) => unauthorized(&refusal.to_string()),
        Ok(Err(error)) => ApiError::from(error).into_response(),
        Err(error) => ApiError::from(error).into_response(),
    }
}

fn bearer(request: &Request) -> Option<String> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

fn access_token(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
        .map(str::to_owned)
}

fn unauthorized(message: &str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}
