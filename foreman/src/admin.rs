//! `foreman token create|list|revoke` (through the REST API: the running
//! foreman owns the store) and `foreman cert rotate` (offline, on the data dir).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::Value;

use crate::client::Client;
use crate::store::{TokenKind, TokenRole};
use crate::tokens::rfc3339;

/// Makes a token and prints its string (shown only this once) on stdout.
pub fn create(
    client: &Client,
    kind: TokenKind,
    role: Option<TokenRole>,
    name: &str,
    expires_at_ms: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let made = client.post(
        "/api/tokens",
        &serde_json::json!({
            "kind": kind.as_str(),
            "name": name,
            "expires_at_ms": expires_at_ms,
            "role": role.map(TokenRole::as_str),
        }),
    )?;
    let token = made["token"]
        .as_str()
        .context("the foreman returned no token")?;
    let expires = made["expires_at_ms"]
        .as_u64()
        .map_or("never".to_owned(), rfc3339);
    let role = made["role"]
        .as_str()
        .map_or(String::new(), |role| format!(", role {role}"));
    eprintln!(
        "{} token {} ({name}{role}), expires {expires}; it is shown only now:",
        crate::tokens::what(kind),
        made["id"]
    );
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

/// The tokens as a table (never a secret: the foreman keeps none).
pub fn list(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let listed = client.get("/api/tokens")?;
    if json {
        return crate::client::print_json(&listed);
    }
    let time = |v: &Value| v.as_u64().map_or("-".to_owned(), rfc3339);
    println!(
        "{:>4}  {:<6}  {:<5}  {:<20}  {:<20}  {:<20}  {:<20}  {:<20}",
        "ID", "KIND", "ROLE", "NAME", "CREATED", "EXPIRES", "REVOKED", "LAST USED"
    );
    for token in listed["tokens"].as_array().into_iter().flatten() {
        println!(
            "{:>4}  {:<6}  {:<5}  {:<20}  {:<20}  {:<20}  {:<20}  {:<20}",
            token["id"].to_string(),
            token["kind"].as_str().unwrap_or("?"),
            token["role"].as_str().unwrap_or("-"),
            token["name"].as_str().unwrap_or(""),
            time(&token["created_at_ms"]),
            time(&token["expires_at_ms"]),
            time(&token["revoked_at_ms"]),
            time(&token["last_used_ms"]),
        );
    }
    println!(
        "join tokens pair with this certificate: wgw_ID_SECRET:{}",
        listed["fingerprint"].as_str().unwrap_or("?")
    );
    Ok(ExitCode::SUCCESS)
}

pub fn revoke(client: &Client, id: u64) -> anyhow::Result<ExitCode> {
    let row = client.post(&format!("/api/tokens/{id}/revoke"), &serde_json::json!({}))?;
    eprintln!(
        "token {id} revoked at {}",
        row["revoked_at_ms"]
            .as_u64()
            .map_or("?".to_owned(), rfc3339)
    );
    Ok(ExitCode::SUCCESS)
}

/// `foreman cert rotate`: prints the new fingerprint and what to do next.
pub fn rotate(data_dir: &Path) -> anyhow::Result<ExitCode> {
    let fingerprint = crate::identity::rotate(data_dir)?;
    eprintln!(
        "new certificate in {} (the old pair is kept as *.previous).\n\
         Restart the foreman, then give workers their join token's secret with the new \
         fingerprint: wgw_ID_SECRET:{fingerprint}",
        data_dir.display()
    );
    println!("{fingerprint}");
    Ok(ExitCode::SUCCESS)
}
