//! The job's config JSON to a plugin's config type.

use serde::de::DeserializeOwned;

/// Parses a job's config JSON (`JobInfo::config_json`) into `C`.
///
/// Empty text, `null` and `{}` give `C::default()` (the last through `C`'s own serde
/// defaults); any other non-object is refused. The errors read `invalid config: ...` and
/// `config must be a JSON object`, and fail the job when returned from `init`.
pub fn from_json<C: DeserializeOwned + Default>(text: &str) -> Result<C, String> {
    let invalid = |e: serde_json::Error| format!("invalid config: {e}");

    let value: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(text).map_err(invalid)?
    };
    match value {
        serde_json::Value::Null => Ok(C::default()),
        serde_json::Value::Object(_) => serde_json::from_value(value).map_err(invalid),
        _ => Err("config must be a JSON object".into()),
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Config {
        limit: u32,
    }

    impl Default for Config {
        fn default() -> Self {
            Self { limit: 7 }
        }
    }

    #[test]
    fn absent_null_and_empty_give_the_defaults() {
        for text in ["", "  ", "null", "{}"] {
            assert_eq!(
                from_json::<Config>(text).unwrap(),
                Config::default(),
                "{text:?}"
            );
        }
        assert_eq!(from_json::<Config>(r#"{"limit": 3}"#).unwrap().limit, 3);
    }

    #[test]
    fn bad_config_is_refused_with_the_reason() {
        let typo = from_json::<Config>(r#"{"limt": 3}"#).unwrap_err();
        assert!(
            typo.starts_with("invalid config: unknown field `limt`"),
            "{typo}"
        );
        let syntax = from_json::<Config>("{").unwrap_err();
        assert!(syntax.starts_with("invalid config: "), "{syntax}");
        assert_eq!(
            from_json::<Config>("[1]").unwrap_err(),
            "config must be a JSON object"
        );
    }
}
