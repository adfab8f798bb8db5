//! Tokens: create, list, revoke (join tokens for workers, client tokens for this API).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiState, Caller};
use crate::store::{TokenKind, TokenRole, TokenRow};

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateToken {
    /// `worker` (joins workers; the default) or `client` (calls this API).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    /// Refused from then on (unix milliseconds); never when absent.
    pub expires_at_ms: Option<u64>,
    /// A client token's role: `admin`, `user` (the default) or `read`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub role: Option<String>,
}

/// A new token: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub row: TokenRow,
    /// The string to hand out: `wgw_ID_SECRET:FINGERPRINT` for a worker,
    /// `wgc_ID_SECRET` for a client.
    pub token: String,
}

/// The tokens, and the certificate fingerprint a join token's secret pairs with.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    /// sha256 of the foreman's certificate: join with `wgw_ID_SECRET:FINGERPRINT`.
    pub fingerprint: String,
    pub tokens: Vec<TokenRow>,
}

/// Makes a token and shows it once; only its hash is stored.
#[utoipa::path(post, path = "/api/tokens", tag = "tokens", request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = super::ErrorBody),
        (status = 401, description = "unauthorized")))]
pub(super) async fn create(
    State(state): State<Arc<ApiState>>,
    body: Bytes,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message);
    let request: CreateToken = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
    let kind = match request.kind.as_deref() {
        None => TokenKind::Worker,
        Some(kind) => kind.parse().map_err(bad)?,
    };
    let role = match (kind, request.role.as_deref()) {
        (TokenKind::Worker, None) => None,
        (TokenKind::Worker, Some(_)) => {
            return Err(bad(
                "a worker token has no role: roles are for client tokens".into(),
            ))
        }
        (TokenKind::Client, None) => Some(TokenRole::User),
        (TokenKind::Client, Some(role)) => Some(role.parse().map_err(bad)?),
    };
    let tokens = state.security.tokens.clone();
    let name = request.name;
    let expires = request.expires_at_ms;
    let issued = tokio::task::spawn_blocking(move || match role {
        Some(role) => tokens.issue_client(role, &name, expires),
        None => tokens.issue(kind, &name, expires),
    })
    .await??;
    let token = match kind {
        TokenKind::Worker => format!("{}:{}", issued.token, state.security.fingerprint),
        TokenKind::Client => issued.token,
    };
    tracing::info!(token = issued.row.id, kind = kind.as_str(), role = ?role, "token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            row: issued.row,
            token,
        }),
    ))
}

/// Every token, without secrets (none are kept).
#[utoipa::path(get, path = "/api/tokens", tag = "tokens",
    responses((status = 200, body = TokenList), (status = 401, description = "unauthorized")))]
pub(super) async fn list(State(state): State<Arc<ApiState>>) -> Result<Json<TokenList>, ApiError> {
    let tokens = state.security.tokens.clone();
    let rows = tokio::task::spawn_blocking(move || tokens.list()).await??;
    Ok(Json(TokenList {
        fingerprint: state.security.fingerprint.clone(),
        tokens: rows,
    }))
}

/// Revokes a token at once: calls with it are refused and workers that
/// joined with it are disconnected (their tasks run elsewhere).
#[utoipa::path(post, path = "/api/tokens/{id}/revoke", tag = "tokens",
    params(("id" = u64, Path)),
    responses((status = 200, body = TokenRow), (status = 404, body = super::ErrorBody),
        (status = 401, description = "unauthorized")))]
pub(super) async fn revoke(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<u64>,
) -> Result<Json<TokenRow>, ApiError> {
    let tokens = state.security.tokens.clone();
    let row = tokio::task::spawn_blocking(move || tokens.revoke(id))
        .await??
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no token with id {id}"),
            )
        })?;
    tracing::info!(token = id, "token revoked");
    Ok(Json(row))
}

/// Who the caller is, as its token says: for pages that offer only what it may do.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    /// The client token presented; none when the call came without one.
    pub token_id: Option<u64>,
    pub role: Option<TokenRole>,
}

/// The token this call came with, and its role.
#[utoipa::path(get, path = "/api/whoami", tag = "tokens",
    responses((status = 200, body = WhoAmI), (status = 401, description = "unauthorized")))]
pub(super) async fn whoami(caller: Option<Extension<Caller>>) -> Json<WhoAmI> {
    Json(WhoAmI {
        token_id: caller.as_ref().map(|c| c.token_id),
        role: caller.map(|c| c.role),
    })
}
