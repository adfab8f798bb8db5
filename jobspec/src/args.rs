//! `args.json`: one JSON value per task.

use serde_json::value::RawValue;

/// Why an `args.json` cannot make a job.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("args.json is not valid JSON: {0}")]
    NotJson(String),
    #[error("args.json must be a JSON array with one element per task, but it is {0}")]
    NotArray(&'static str),
    #[error("args.json is an empty array: a job needs at least one task")]
    Empty,
}

/// Splits an `args.json` into one raw JSON text per task, without re-encoding.
pub fn split_args(text: &str) -> Result<Vec<&RawValue>, ArgsError> {
    match serde_json::from_str::<Vec<&RawValue>>(text) {
        Ok(elements) if elements.is_empty() => Err(ArgsError::Empty),
        Ok(elements) => Ok(elements),
        Err(error) => match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Err(ArgsError::NotArray(json_kind(text))),
            Err(_) => Err(ArgsError::NotJson(error.to_string())),
        },
    }
}

fn json_kind(text: &str) -> &'static str {
    match text.trim_start().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_must_be_a_non_empty_json_array() {
        assert!(matches!(split_args("[1, 2"), Err(ArgsError::NotJson(_))));
        assert_eq!(
            split_args("{\"a\": 1}").unwrap_err(),
            ArgsError::NotArray("an object")
        );
        assert_eq!(
            split_args(" 42 ").unwrap_err(),
            ArgsError::NotArray("a number")
        );
        assert_eq!(split_args("[]").unwrap_err(), ArgsError::Empty);
    }

    #[test]
    fn elements_keep_their_exact_text() {
        let parts = split_args("[[1, 2], {\"x\": \"y\"}, 3]").unwrap();
        let texts: Vec<&str> = parts.iter().map(|p| p.get()).collect();
        assert_eq!(texts, ["[1, 2]", "{\"x\": \"y\"}", "3"]);
    }

    #[test]
    fn not_json_message_says_where() {
        let err = split_args("[1, }").unwrap_err().to_string();
        assert!(err.contains("line 1 column"), "{err}");
    }
}
