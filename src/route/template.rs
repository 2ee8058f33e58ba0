//! Path templates: `/chat/{room}`, `/files/{*rest}`. A placeholder is a whole segment; `{*name}`
//! takes the remainder of the path (possibly empty) and must come last.

use std::fmt;

/// One segment of a parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// Must equal the request segment byte for byte.
    Literal(String),
    /// Captures exactly one segment (which may not be empty).
    Param(String),
    /// Captures the rest of the path, slashes included; may be empty.
    CatchAll(String),
}

/// How specific a template is; lower sorts first when choosing between matching routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Specificity {
    /// No placeholders at all.
    Exact,
    /// `{name}` placeholders but no catch-all.
    Template,
    /// Ends in `{*name}`.
    CatchAll,
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    source: String,
    segments: Vec<Segment>,
}

/// Placeholder values captured from a request path, in template order.
pub type Params = Vec<(String, String)>;

impl PathTemplate {
    /// Parses `text`; the error says what is wrong in one line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("path template {text:?} must start with '/'"));
        };
        if text.contains(['?', '#']) {
            return Err(format!(
                "path template {text:?} must not contain '?' or '#' (the query string is matched separately and passed upstream as is)"
            ));
        }
        let raw: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let mut segments = Vec::with_capacity(raw.len());
        for (i, seg) in raw.iter().enumerate() {
            let parsed = parse_segment(seg).map_err(|e| format!("path template {text:?}: {e}"))?;
            if let Segment::Literal(lit) = &parsed {
                // Requests are matched in their normal form, where these never appear.
                if lit.is_empty() && i + 1 != raw.len() {
                    return Err(format!(
                        "path template {text:?}: empty segment ('//' in a request is merged into '/', so this never matches)"
                    ));
                }
            }
            if let Segment::CatchAll(name) = &parsed {
                if i + 1 != raw.len() {
                    return Err(format!(
                        "path template {text:?}: catch-all {{*{name}}} must be the last segment"
                    ));
                }
            }
            if let Segment::Param(name) | Segment::CatchAll(name) = &parsed {
                let dup = segments
                    .iter()
                    .any(|s| matches!(s, Segment::Param(n) | Segment::CatchAll(n) if n == name));
                if dup {
                    return Err(format!(
                        "path template {text:?}: placeholder {{{name}}} appears twice"
                    ));
                }
            }
            segments.push(parsed);
        }
        Ok(PathTemplate {
            source: text.to_owned(),
            segments,
        })
    }

    /// How this template ranks against others that also match.
    pub fn specificity(&self) -> Specificity {
        match self.segments.last() {
            Some(Segment::CatchAll(_)) => Specificity::CatchAll,
            _ if self.segments.iter().any(|s| matches!(s, Segment::Param(_))) => {
                Specificity::Template
            }
            _ => Specificity::Exact,
        }
    }

    /// The names of all placeholders, in order.
    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(n) | Segment::CatchAll(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// The first segment when it is literal: a request must start with it to match.
    pub(crate) fn first_literal(&self) -> Option<&str> {
        match self.segments.first() {
            Some(Segment::Literal(s)) => Some(s),
            _ => None,
        }
    }

    /// The path an exact template (no placeholders) matches, in normal form.
    pub(crate) fn exact_path(&self) -> Option<String> {
        let mut out = String::with_capacity(self.source.len());
        for seg in &self.segments {
            let Segment::Literal(lit) = seg else {
                return None;
            };
            out.push('/');
            out.push_str(lit);
        }
        if out.is_empty() {
            out.push('/');
        }
        Some(out)
    }

    /// The template as written in the configuration.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Matches a request path (without query string), returning the captured placeholders.
    pub fn matches(&self, path: &str) -> Option<Params> {
        let mut rest = path.strip_prefix('/')?;
        let mut params = Params::new();
        let mut segs = self.segments.iter().peekable();
        if self.segments.is_empty() {
            return rest.is_empty().then_some(params);
        }
        while let Some(seg) = segs.next() {
            if let Segment::CatchAll(name) = seg {
                params.push((name.clone(), rest.to_owned()));
                return Some(params);
            }
            let (head, tail, had_slash) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i + 1..], true),
                None => (rest, "", false),
            };
            match seg {
                Segment::Literal(lit) if lit == head => {}
                Segment::Param(name) if !head.is_empty() => {
                    params.push((name.clone(), head.to_owned()))
                }
                _ => return None,
            }
            rest = tail;
            match segs.peek() {
                // "/api/{*rest}" also matches "/api" (the remainder is empty).
                Some(Segment::CatchAll(_)) if !had_slash => {
                    let Some(Segment::CatchAll(name)) = segs.next() else {
                        unreachable!("peeked a catch-all")
                    };
                    params.push((name.clone(), String::new()));
                    return Some(params);
                }
                Some(_) if !had_slash => return None,
                None if had_slash => return None,
                _ => {}
            }
        }
        Some(params)
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn parse_segment(seg: &str) -> Result<Segment, String> {
    let Some(inner) = seg.strip_prefix('{') else {
        if seg.contains(['{', '}']) {
            return Err(format!(
                "segment {seg:?}: a placeholder must be a whole segment, like {{name}}"
            ));
        }
        // In the normal form requests are matched in: `%7e` is `~`, `%2f` is `%2F`.
        let normal = super::normalize::decode_unreserved(seg).map_err(|e| match e {
            super::normalize::PathError::Nul => {
                format!("segment {seg:?}: %00 is refused in requests, so this never matches")
            }
            _ => format!("segment {seg:?}: '%' must be followed by two hex digits"),
        })?;
        if normal == "." || normal == ".." {
            return Err(format!(
                "segment {seg:?}: dot segment (requests are matched after '.' and '..' are resolved, so this never matches)"
            ));
        }
        return Ok(Segment::Literal(normal));
    };
    let Some(inner) = inner.strip_suffix('}') else {
        if inner.contains('}') {
            return Err(format!(
                "segment {seg:?}: a placeholder must be a whole segment, like {{name}}"
            ));
        }
        return Err(format!("segment {seg:?}: unclosed '{{'"));
    };
    let (catch_all, name) = match inner.strip_prefix('*') {
        Some(name) => (true, name),
        None => (false, inner),
    };
    if !is_identifier(name) {
        return Err(format!(
            "segment {seg:?}: placeholder names are letters, digits and '_', not starting with a digit"
        ));
    }
    Ok(if catch_all {
        Segment::CatchAll(name.to_owned())
    } else {
        Segment::Param(name.to_owned())
    })
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: &str, p: &str) -> Option<Vec<(String, String)>> {
        PathTemplate::parse(t).unwrap().matches(p)
    }

    fn kv(pairs: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn literal_paths() {
        assert_eq!(m("/", "/"), kv(&[]));
        assert_eq!(m("/", "/x"), None);
        assert_eq!(m("/echo", "/echo"), kv(&[]));
        assert_eq!(m("/echo", "/echo/"), None);
        assert_eq!(m("/echo", "/ech"), None);
        assert_eq!(m("/a/b", "/a"), None);
    }

    #[test]
    fn params() {
        assert_eq!(m("/chat/{room}", "/chat/lobby"), kv(&[("room", "lobby")]));
        assert_eq!(m("/chat/{room}", "/chat/"), None);
        assert_eq!(m("/chat/{room}", "/chat/a/b"), None);
        assert_eq!(m("/{a}/x/{b}", "/1/x/2"), kv(&[("a", "1"), ("b", "2")]));
    }

    #[test]
    fn catch_all() {
        assert_eq!(m("/api/{*rest}", "/api/a/b"), kv(&[("rest", "a/b")]));
        assert_eq!(m("/api/{*rest}", "/api/"), kv(&[("rest", "")]));
        assert_eq!(m("/api/{*rest}", "/api"), kv(&[("rest", "")]));
        assert_eq!(m("/api/{*rest}", "/apix"), None);
        assert_eq!(m("/{*all}", "/"), kv(&[("all", "")]));
        assert_eq!(m("/{*all}", "/x/y"), kv(&[("all", "x/y")]));
    }

    #[test]
    fn bad_templates() {
        for bad in [
            "chat",
            "/chat/{room",
            "/chat/{room}.json",
            "/chat/x{room}",
            "/{*a}/b",
            "/{a}/{a}",
            "/{1a}",
            "/x?y",
            "/a//b",
            "/a/./b",
            "/a/../b",
            "/a/%2e%2E/b",
            "/a%zz",
            "/a%2",
            "/a%00",
        ] {
            assert!(
                PathTemplate::parse(bad).is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn literals_are_kept_in_normal_form() {
        // Requests arrive normalised (see `normalize`); the template's literals are too.
        assert_eq!(m("/%7Euser/%c3%a9", "/~user/%C3%A9"), kv(&[]));
        assert_eq!(m("/a%2fb", "/a%2Fb"), kv(&[]));
        assert_eq!(m("/echo/", "/echo/"), kv(&[]));
        assert_eq!(m("/.well-known/{x}", "/.well-known/y"), kv(&[("x", "y")]));
    }

    #[test]
    fn specificity() {
        let s = |t| PathTemplate::parse(t).unwrap().specificity();
        assert_eq!(s("/a/b"), Specificity::Exact);
        assert_eq!(s("/a/{b}"), Specificity::Template);
        assert_eq!(s("/a/{*b}"), Specificity::CatchAll);
    }
}
