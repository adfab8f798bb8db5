//! Query parameters, read by hand so that a bad one is named in the error
//! (axum's `Query` rejection does not always say which field failed).

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::StatusCode;

use super::ApiError;
use crate::store::MAX_PAGE;

/// Items a page holds when the request names no `limit`.
pub const DEFAULT_LIMIT: u64 = 100;

pub(super) struct Params(Vec<(String, String)>);

/// `skip` (default 0) and `limit` (default 100; above 1000 is capped at
/// 1000, 0 gives an empty page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Page {
    pub skip: u64,
    pub limit: u64,
}

pub(super) fn bad_parameter(name: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_parameter",
        format!("{name}: {message}"),
    )
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map(|Query(pairs)| Params(pairs))
            .map_err(|rejection| bad_parameter("query", rejection.body_text()))
    }
}

impl Params {
    /// The last value given for `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.get(name)
            .map(|text| {
                text.parse().map_err(|_| {
                    bad_parameter(
                        name,
                        format!("expected a whole number, 0 or more, not {text:?}"),
                    )
                })
            })
            .transpose()
    }

    /// `name` parsed by `parse`; `expected` lists the valid values for the error.
    pub fn parsed<T>(
        &self,
        name: &str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        self.get(name)
            .map(|text| {
                parse(text).ok_or_else(|| {
                    bad_parameter(
                        name,
                        format!("unknown value {text:?} (expected {expected})"),
                    )
                })
            })
            .transpose()
    }

    pub fn page(&self) -> Result<Page, ApiError> {
        Ok(Page {
            skip: self.u64("skip")?.unwrap_or(0),
            limit: self.u64("limit")?.unwrap_or(DEFAULT_LIMIT).min(MAX_PAGE),
        })
    }
}
