//! Access tokens: the secrets a job joins with, and the tokens the host mints itself.

use std::fmt;
use std::time::Duration;

use livekit_api::access_token::{AccessToken, VideoGrants};
use serde::{Deserialize, Serialize};

/// A token or API secret. It prints as `<redacted>` in `Debug` and `Display`, so a job spec
/// or a configuration can be logged whole without leaking it; [`Secret::expose`] is the
/// only way to the text.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(#[serde(deserialize_with = "any_scalar")] String);

/// A secret's text from a string, or from a number or boolean written without quotes: a
/// type error would print the value.
fn any_scalar<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Integer(i64),
        Float(f64),
        Bool(bool),
    }
    Ok(match Scalar::deserialize(deserializer) {
        Ok(Scalar::Text(text)) => text,
        Ok(Scalar::Integer(n)) => n.to_string(),
        Ok(Scalar::Float(x)) => x.to_string(),
        Ok(Scalar::Bool(b)) => b.to_string(),
        Err(_) => return Err(serde::de::Error::custom("a secret must be text")),
    })
}

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The secret's text, for the one place that sends or signs with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// An API key and secret the host signs its own tokens with.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub key: String,
    pub secret: Secret,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot mint a LiveKit token: {0}")]
pub struct MintError(String);

/// Mints a token for a hidden participant that may join `room` and subscribe, and may not
/// publish anything: what a data-only observer needs and nothing more.
///
/// `canSubscribe` is required, not just allowed: a LiveKit server makes the subscriber
/// connection the primary one (the one that carries data to us) only for participants that
/// may subscribe.
pub fn mint(api: &ApiKey, room: &str, identity: &str, ttl: Duration) -> Result<Secret, MintError> {
    let grants = VideoGrants {
        room_join: true,
        room: room.to_owned(),
        can_subscribe: Some(true),
        can_publish: Some(false),
        can_publish_data: Some(false),
        hidden: true,
        ..Default::default()
    };
    AccessToken::with_api_key(&api.key, api.secret.expose())
        .with_identity(identity)
        .with_name("framehost")
        .with_grants(grants)
        .with_ttl(ttl)
        .to_jwt()
        .map(Secret)
        .map_err(|e| MintError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use livekit_api::access_token::TokenVerifier;

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "<redacted> <redacted>");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"hunter2\"");
    }

    #[test]
    fn minted_token_is_a_hidden_subscriber() {
        let api = ApiKey {
            key: "APIkey".into(),
            secret: Secret::new("a-secret-long-enough-for-hs256-signing"),
        };
        let token = mint(&api, "room-1", "framehost-job-1", Duration::from_secs(60)).unwrap();
        let claims = TokenVerifier::with_api_key(&api.key, api.secret.expose())
            .verify(token.expose())
            .unwrap();
        assert_eq!(claims.sub, "framehost-job-1");
        assert!(claims.video.room_join && claims.video.hidden);
        assert_eq!(claims.video.room, "room-1");
        assert_eq!(claims.video.can_subscribe, Some(true));
        assert_eq!(claims.video.can_publish, Some(false));
        assert_eq!(claims.video.can_publish_data, Some(false));

        let wrong = TokenVerifier::with_api_key(&api.key, "another-secret-of-enough-length");
        assert!(wrong.verify(token.expose()).is_err());
    }
}
