//! Decoding one element of `args.json` into a task's parameters.
//!
//! An element may be
//! - an array of positional arguments: `[1, 100]` for `fn f(lo: u64, hi: u64)`;
//! - an object naming them: `{"lo": 1, "hi": 100}`;
//! - for a task with one parameter, that parameter's value itself: `100`
//!   (or `[100]`, or `{"hi": 100}` when the value alone does not fit);
//! - for a task with no parameters: `null`, `[]` or `{}`.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::TaskError;

enum Shape {
    Positional(Vec<Value>),
    Named(Map<String, Value>),
    Single(Value),
}

/// Hands out a task's parameters, one by one, from one JSON argument set.
pub struct ArgDecoder {
    params: &'static [&'static str],
    shape: Shape,
}

impl ArgDecoder {
    /// Checks the argument set's shape against the parameter names.
    pub fn new(args_json: &str, params: &'static [&'static str]) -> Result<Self, TaskError> {
        let value: Value = serde_json::from_str(args_json)
            .map_err(|e| TaskError::BadArgs(format!("not valid JSON: {e}")))?;
        let expected = || signature(params);
        let shape = match (params.len(), value) {
            (0, Value::Null) => Shape::Positional(Vec::new()),
            (0, Value::Array(items)) if items.is_empty() => Shape::Positional(items),
            (0, Value::Object(map)) if map.is_empty() => Shape::Named(map),
            (0, other) => {
                return Err(TaskError::BadArgs(format!(
                    "the task takes no arguments, but got {}",
                    describe(&other)
                )))
            }
            (1, value) => Shape::Single(value),
            (n, Value::Array(items)) if items.len() == n => Shape::Positional(items),
            (n, Value::Array(items)) => {
                return Err(TaskError::BadArgs(format!(
                    "expected {n} arguments {}, got an array of {}",
                    expected(),
                    items.len()
                )))
            }
            (_, Value::Object(map)) => {
                if let Some(unknown) = map.keys().find(|k| !params.contains(&k.as_str())) {
                    return Err(TaskError::BadArgs(format!(
                        "unknown argument `{unknown}`; the task takes {}",
                        expected()
                    )));
                }
                Shape::Named(map)
            }
            (n, other) => {
                return Err(TaskError::BadArgs(format!(
                    "expected an array of {n} arguments {} or an object with those names, got {}",
                    expected(),
                    describe(&other)
                )))
            }
        };
        Ok(ArgDecoder { params, shape })
    }

    /// Decodes parameter `index`; each parameter is taken once.
    pub fn take<T: DeserializeOwned>(&mut self, index: usize) -> Result<T, TaskError> {
        let name = self.params.get(index).copied().unwrap_or("?");
        let position = format!(
            "argument `{name}` (#{} of {})",
            index + 1,
            self.params.len()
        );
        let fail = |e: serde_json::Error| TaskError::BadArgs(format!("{position}: {e}"));
        match &mut self.shape {
            Shape::Positional(items) => {
                let value = items.get_mut(index).map(Value::take).unwrap_or(Value::Null);
                T::deserialize(value).map_err(fail)
            }
            Shape::Named(map) => match map.remove(name) {
                Some(value) => T::deserialize(value).map_err(fail),
                None => T::deserialize(Value::Null)
                    .map_err(|_| TaskError::BadArgs(format!("{position} is missing"))),
            },
            Shape::Single(value) => {
                let first_error = match T::deserialize(&*value) {
                    Ok(decoded) => return Ok(decoded),
                    Err(error) => error,
                };
                let unwrapped = match value {
                    Value::Array(items) if items.len() == 1 => items.first(),
                    Value::Object(map) if map.len() == 1 => map.get(name),
                    _ => None,
                };
                unwrapped
                    .and_then(|inner| T::deserialize(inner).ok())
                    .ok_or_else(|| fail(first_error))
            }
        }
    }
}

fn signature(params: &[&str]) -> String {
    format!("({})", params.join(", "))
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(_) => "a number".into(),
        Value::String(_) => "a string".into(),
        Value::Array(items) => format!("an array of {}", items.len()),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two(json: &str) -> Result<(u64, String), TaskError> {
        let mut d = ArgDecoder::new(json, &["n", "name"])?;
        Ok((d.take(0)?, d.take(1)?))
    }

    fn bad(result: Result<impl std::fmt::Debug, TaskError>) -> String {
        match result {
            Err(TaskError::BadArgs(message)) => message,
            other => panic!("expected BadArgs, got {other:?}"),
        }
    }

    #[test]
    fn positional_and_named_arguments() {
        assert_eq!(two(r#"[3, "x"]"#).unwrap(), (3, "x".into()));
        assert_eq!(two(r#"{"name": "y", "n": 4}"#).unwrap(), (4, "y".into()));
    }

    #[test]
    fn wrong_type_names_the_argument() {
        let message = bad(two(r#"[3, 4]"#));
        assert!(
            message.starts_with(
                "argument `name` (#2 of 2): invalid type: integer `4`, expected a string"
            ),
            "{message}"
        );
    }

    #[test]
    fn wrong_count_and_shape_are_explained() {
        assert_eq!(
            bad(two("[1]")),
            "expected 2 arguments (n, name), got an array of 1"
        );
        assert_eq!(
            bad(two("7")),
            "expected an array of 2 arguments (n, name) or an object with those names, got a number"
        );
        assert_eq!(
            bad(two(r#"{"n": 1, "nmae": "x"}"#)),
            "unknown argument `nmae`; the task takes (n, name)"
        );
        assert_eq!(
            bad(two(r#"{"n": 1}"#)),
            "argument `name` (#2 of 2) is missing"
        );
        assert!(bad(two("[1,")).starts_with("not valid JSON"));
    }

    #[test]
    fn optional_named_arguments_may_be_left_out() {
        let mut d = ArgDecoder::new(r#"{"a": 1}"#, &["a", "b"]).unwrap();
        assert_eq!(d.take::<u8>(0).unwrap(), 1);
        assert_eq!(d.take::<Option<u8>>(1).unwrap(), None);
    }

    #[test]
    fn a_single_parameter_takes_the_value_itself_or_wrapped() {
        let single =
            |json: &str| ArgDecoder::new(json, &["xs"]).and_then(|mut d| d.take::<Vec<u32>>(0));
        assert_eq!(single("[1, 2]").unwrap(), [1, 2]);
        assert_eq!(single("[[5]]").unwrap(), [5]);
        assert_eq!(single(r#"{"xs": [7]}"#).unwrap(), [7]);
        let scalar = |json: &str| ArgDecoder::new(json, &["n"]).and_then(|mut d| d.take::<u64>(0));
        assert_eq!(scalar("9").unwrap(), 9);
        assert_eq!(scalar("[9]").unwrap(), 9);
        assert!(
            bad(scalar(r#""nine""#)).starts_with("argument `n` (#1 of 1): invalid type: string")
        );
    }

    #[test]
    fn no_parameters_accept_only_empty_arguments() {
        for ok in ["null", "[]", "{}"] {
            assert!(ArgDecoder::new(ok, &[]).is_ok(), "{ok}");
        }
        assert_eq!(
            bad(ArgDecoder::new("[1]", &[]).map(|_| ())),
            "the task takes no arguments, but got an array of 1"
        );
    }
}
