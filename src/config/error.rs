//! Configuration errors that point at the offending text: `file:line:column: message`, plus a
//! one-line hint on how to fix it.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// A configuration problem, located in the source file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file the configuration came from (or a label such as `<inline>`).
    pub origin: PathBuf,
    /// 1-based line of the offending value; 0 when the problem has no location (e.g. unreadable file).
    pub line: usize,
    /// 1-based column of the offending value; 0 when unknown.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when there is something useful to say.
    pub hint: Option<String>,
}

impl ConfigError {
    /// Builds an error located at byte `span` of `source`.
    pub(crate) fn at(
        origin: &std::path::Path,
        source: &str,
        span: Option<Range<usize>>,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> Self {
        let (line, column) = span.map_or((0, 0), |s| line_column(source, s.start));
        ConfigError {
            origin: origin.to_path_buf(),
            line,
            column,
            message: message.into(),
            hint,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// 1-based (line, column) of byte `offset`; columns count characters, not bytes.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("é\nx", 3), (2, 1));
    }
}
