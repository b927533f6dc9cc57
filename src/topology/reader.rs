//! The spanned-TOML walker every part of a topology file is read with: a context that collects
//! errors with their `FILE:LINE:COLUMN` position (`Cx`), a table being read with its dotted path
//! (`Obj`), and typed readers (strings, integers in a range, addresses, durations, choices,
//! arrays) that report a wrong type or value instead of stopping at it.
//!
//! Owns: positions, the generic messages (wrong type, out of range, unknown or missing field,
//! with did-you-mean hints), sorting and deduplicating the errors, and naming the field of a
//! TOML syntax error. Does not own: the schema, i.e. which fields exist, what they mean and the
//! checks across them (`regions`, `cluster`, `rules`, `failover`, `limits`, `tls`).

use std::net::SocketAddr;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::TopologyError;
use crate::units::{parse_duration, parse_host_port};

// ---------------------------------------------------------------------------------------------
// Reading: a context that collects errors, and typed readers over the spanned tree
// ---------------------------------------------------------------------------------------------

pub(super) type Val<'i> = Spanned<DeValue<'i>>;

pub(super) struct Cx<'a> {
    text: &'a str,
    file: String,
    line_starts: Vec<usize>,
    pub(super) errors: Vec<TopologyError>,
}

impl<'a> Cx<'a> {
    pub(super) fn new(text: &'a str, file: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Cx {
            text,
            file: file.to_string(),
            line_starts,
            errors: Vec::new(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn pos(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let column = self
            .text
            .get(start..offset)
            .map(|s| s.chars().count())
            .unwrap_or(offset - start);
        (line + 1, column + 1)
    }

    pub(super) fn line(&self, offset: usize) -> usize {
        self.pos(offset).0
    }

    pub(super) fn err(
        &mut self,
        at: usize,
        field: &str,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        let (line, column) = self.pos(at);
        self.errors.push(TopologyError {
            file: self.file.clone(),
            line,
            column,
            field: field.to_string(),
            message: message.into(),
            hint,
        });
    }

    pub(super) fn finish(mut self) -> Vec<TopologyError> {
        self.errors.sort_by(|a, b| {
            (a.line, a.column, &a.field, &a.message).cmp(&(b.line, b.column, &b.field, &b.message))
        });
        self.errors.dedup();
        self.errors
    }

    /// A TOML syntax error, with the field guessed from the line it is on.
    pub(super) fn syntax_error(&mut self, e: &toml::de::Error) {
        let at = e.span().map(|s| s.start).unwrap_or(0);
        let fields = fields_by_line(self.text);
        let line = self.line(at) - 1;
        let field = fields.get(line).cloned().flatten().unwrap_or_default();
        if e.message() == "duplicate key" && !field.is_empty() {
            let first = fields[..line]
                .iter()
                .position(|f| f.as_deref() == Some(field.as_str()))
                .map(|l| format!("first defined at line {}", l + 1));
            let parts: Vec<&str> = field.split('.').collect();
            let message = match parts.as_slice() {
                ["regions", name] => format!("region `{name}` is defined twice"),
                _ => format!("`{field}` is defined twice"),
            };
            self.err(at, &field, message, first);
        } else {
            self.err(at, &field, e.message().to_string(), None);
        }
    }

    pub(super) fn table<'t, 'i>(&mut self, v: &'t Val<'i>, path: &str) -> Option<Obj<'t, 'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(Obj {
                t,
                path: path.to_string(),
                at: v.span().start,
            }),
            other => {
                self.type_err(v, path, "a table", other);
                None
            }
        }
    }

    pub(super) fn type_err(
        &mut self,
        v: &Val<'_>,
        field: &str,
        expected: &str,
        found: &DeValue<'_>,
    ) {
        self.err(
            v.span().start,
            field,
            format!("expected {expected}, found {}", found.type_str()),
            None,
        );
    }

    fn string(&mut self, v: &Val<'_>, field: &str) -> Option<String> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            other => {
                self.type_err(v, field, "a string", other);
                None
            }
        }
    }

    pub(super) fn nonempty_string(&mut self, v: &Val<'_>, field: &str) -> Option<String> {
        let s = self.string(v, field)?;
        if s.trim().is_empty() {
            self.err(v.span().start, field, "may not be empty", None);
            return None;
        }
        Some(s)
    }

    pub(super) fn int(&mut self, v: &Val<'_>, field: &str, min: i64, max: i64) -> Option<i64> {
        match v.get_ref() {
            DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) if (min..=max).contains(&n) => Some(n),
                _ => {
                    self.err(
                        v.span().start,
                        field,
                        format!("{i} is out of range ({min} to {max})"),
                        None,
                    );
                    None
                }
            },
            other => {
                self.type_err(v, field, "an integer", other);
                None
            }
        }
    }

    /// A listener address: `IP:PORT` (host names are not resolved for listeners).
    pub(super) fn addr(&mut self, v: &Val<'_>, field: &str) -> Option<SocketAddr> {
        let s = self.string(v, field)?;
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    v.span().start,
                    field,
                    format!("`{s}` is not an IP:PORT address"),
                    Some(
                        "write e.g. `127.0.0.1:19092`, `0.0.0.0:9092` or `[::1]:9092`; \
                         host names belong in `advertised`"
                            .into(),
                    ),
                );
                None
            }
        }
    }

    pub(super) fn host_port(&mut self, v: &Val<'_>, field: &str) -> Option<(String, u16)> {
        let s = self.string(v, field)?;
        match parse_host_port(&s) {
            Ok(hp) => Some(hp),
            Err(m) => {
                self.err(
                    v.span().start,
                    field,
                    m,
                    Some("write HOST:PORT, e.g. `kafka-east.example.com:9092`".into()),
                );
                None
            }
        }
    }

    /// A duration: a string with a unit (`10s`) or an integer number of milliseconds.
    pub(super) fn duration(&mut self, v: &Val<'_>, field: &str) -> Option<Duration> {
        let hint = Some("write e.g. `500ms`, `10s`, `5m`, `2h` or `7d`".to_string());
        match v.get_ref() {
            DeValue::Integer(_) => self
                .int(v, field, 0, i64::MAX)
                .map(|n| Duration::from_millis(n as u64)),
            DeValue::String(s) => {
                // Guard the unit multiplication in `parse_duration` against overflow (it
                // multiplies without checking).
                let digits: String = s
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                let too_big = digits
                    .parse::<u128>()
                    .is_ok_and(|n| n * 86_400_000 > u64::MAX as u128)
                    || digits.len() > 30;
                if too_big {
                    self.err(v.span().start, field, format!("`{s}` is too long"), hint);
                    return None;
                }
                match parse_duration(s) {
                    Ok(d) => Some(d),
                    Err(m) => {
                        // `units` ends its messages with a parenthesised suggestion: make it
                        // the hint.
                        let (m, h) = match m.rsplit_once(" (") {
                            Some((m, h)) if h.ends_with(')') => {
                                (m.to_string(), Some(h.trim_end_matches(')').to_string()))
                            }
                            _ => (m, hint),
                        };
                        self.err(v.span().start, field, m, h);
                        None
                    }
                }
            }
            other => {
                self.type_err(v, field, "a duration such as \"10s\"", other);
                None
            }
        }
    }

    /// One of `options` (exact, lowercase); returns its index.
    pub(super) fn choice(&mut self, v: &Val<'_>, field: &str, options: &[&str]) -> Option<usize> {
        let s = self.string(v, field)?;
        match options.iter().position(|o| *o == s) {
            Some(i) => Some(i),
            None => {
                let list = options
                    .iter()
                    .map(|o| format!("`{o}`"))
                    .collect::<Vec<_>>()
                    .join(" or ");
                self.err(
                    v.span().start,
                    field,
                    format!("`{s}` is not one of {list}"),
                    suggest(&s, options).map(|m| format!("did you mean `{m}`?")),
                );
                None
            }
        }
    }

    pub(super) fn array<'t, 'i>(&mut self, v: &'t Val<'i>, field: &str) -> Option<&'t [Val<'i>]> {
        match v.get_ref() {
            DeValue::Array(a) => Some(&a[..]),
            other => {
                self.type_err(v, field, "an array", other);
                None
            }
        }
    }
}

/// A table being read: its path for error messages and where it starts.
pub(super) struct Obj<'t, 'i> {
    pub(super) t: &'t DeTable<'i>,
    pub(super) path: String,
    pub(super) at: usize,
}

impl<'t, 'i> Obj<'t, 'i> {
    pub(super) fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<&'t Val<'i>> {
        self.t.get(key)
    }

    /// Entries in file order.
    pub(super) fn entries(&self) -> Vec<(&'t Spanned<std::borrow::Cow<'i, str>>, &'t Val<'i>)> {
        let mut e: Vec<_> = self.t.iter().collect();
        e.sort_by_key(|(k, _)| k.span().start);
        e
    }

    /// Report keys not in `allowed`, with a did-you-mean hint.
    pub(super) fn known(&self, cx: &mut Cx<'_>, allowed: &[&str]) {
        for (k, _) in self.entries() {
            let key = k.get_ref().as_ref();
            if !allowed.contains(&key) {
                let hint = match suggest(key, allowed) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None => format!("expected one of: {}", allowed.join(", ")),
                };
                cx.err(
                    k.span().start,
                    &self.field(key),
                    format!("unknown field `{key}`"),
                    Some(hint),
                );
            }
        }
    }

    pub(super) fn required(
        &self,
        cx: &mut Cx<'_>,
        key: &str,
        hint: Option<String>,
    ) -> Option<&'t Val<'i>> {
        let v = self.get(key);
        if v.is_none() {
            cx.err(
                self.at,
                &self.field(key),
                format!("missing field `{key}`"),
                hint,
            );
        }
        v
    }
}

/// The closest of `options` to `word` if it is close enough to be a likely typo.
fn suggest<'o>(word: &str, options: &[&'o str]) -> Option<&'o str> {
    let w = word.to_lowercase();
    options
        .iter()
        .map(|o| (edit_distance(&w, o), *o))
        .filter(|(d, o)| *d <= 2.max(o.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, o)| o)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// For each line, the dotted key it defines (`[a.b]` gives `a.b`, `k = v` under it `a.b.k`).
/// Only used to name the field of a TOML syntax error.
fn fields_by_line(text: &str) -> Vec<Option<String>> {
    let norm = |s: &str| {
        s.split('.')
            .map(|p| p.trim().trim_matches(|c| c == '"' || c == '\''))
            .collect::<Vec<_>>()
            .join(".")
    };
    let mut table = String::new();
    text.lines()
        .map(|line| {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("[[") {
                table = norm(rest.split("]]").next().unwrap_or(rest));
                Some(table.clone())
            } else if let Some(rest) = t.strip_prefix('[') {
                table = norm(rest.split(']').next().unwrap_or(rest));
                Some(table.clone())
            } else if !t.starts_with('#') && t.contains('=') {
                let key = norm(t.split('=').next().unwrap_or(""));
                Some(if table.is_empty() {
                    key
                } else {
                    format!("{table}.{key}")
                })
            } else if table.is_empty() {
                None
            } else {
                Some(table.clone())
            }
        })
        .collect()
}
