//! A host's operations endpoint as a scraper and a probe see it: a plain HTTP GET, and the
//! Prometheus text format read into samples.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// One HTTP answer: status code and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    pub body: String,
}

/// `GET path` on 127.0.0.1:`port`, with the connection closed after the answer.
pub async fn get(port: u16, path: &str) -> anyhow::Result<Answer> {
    request(port, "GET", path).await
}

/// `method path` (no body) on 127.0.0.1:`port`, with the connection closed after the answer.
pub async fn request(port: u16, method: &str, path: &str) -> anyhow::Result<Answer> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .with_context(|| format!("cannot connect to 127.0.0.1:{port}"))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("{method} {path} on port {port} took more than 10 s"))??;
    let text = String::from_utf8(raw).context("the answer is not UTF-8")?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no end of headers in {text:?}");
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    Ok(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// One sample of a scrape: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` answer.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// `# TYPE` lines: metric family name to type.
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    /// Reads the Prometheus text exposition format (0.0.4).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut scrape = Scrape::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE")
                    && let (Some(name), Some(kind)) = (words.next(), words.next())
                {
                    scrape.types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            let sample =
                parse_sample(line).with_context(|| format!("line {}: {line:?}", number + 1))?;
            scrape.samples.push(sample);
        }
        Ok(scrape)
    }

    /// The samples named `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of [`Scrape::matching`] samples; 0 when there are none (a counter never
    /// incremented for those labels is not exported at all).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The value of the one sample named `name` with exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels)
            .find(|sample| sample.labels.len() == labels.len())
            .map(|s| s.value)
    }
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .context("no value")?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once('=').context("a label without '='")?;
            let after = after
                .strip_prefix('"')
                .context("a label value without quotes")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("a label value ends in an escape"),
                    },
                    Some((_, c)) => value.push(c),
                    None => bail!("an unterminated label value"),
                }
            };
            labels.insert(key.trim().to_owned(), value);
            rest = &after[end + 1..];
        }
    }
    let value = rest
        .split_whitespace()
        .next()
        .context("no value after the labels")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other
            .parse()
            .with_context(|| format!("{other:?} is not a number"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_labels_escapes_and_special_values() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\n\
            a_total{job_type=\"t\",reason=\"x\\\"y\\\\z\"} 3\n\
            b_bucket{le=\"+Inf\"} 7\n\
            c 1.5e3\n";
        let scrape = Scrape::parse(text).unwrap();
        assert_eq!(scrape.types["a_total"], "counter");
        assert_eq!(
            scrape.value("a_total", &[("job_type", "t"), ("reason", "x\"y\\z")]),
            Some(3.0)
        );
        assert_eq!(scrape.sum("a_total", &[("job_type", "t")]), 3.0);
        assert_eq!(scrape.value("b_bucket", &[("le", "+Inf")]), Some(7.0));
        assert_eq!(scrape.value("c", &[]), Some(1500.0));
        assert!(Scrape::parse("d{x=\"1} 2").is_err());
    }
}
