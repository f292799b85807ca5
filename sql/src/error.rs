//! Errors of the SQL front end, rendered like a compiler's: `file:line:column`, the quoted line,
//! a caret under the offending text and a `help:` hint.

use std::fmt;

/// Where in a pipeline file something is: 1-based line and column, plus the quoted line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLocation {
    /// The file the statement came from, as given on the command line.
    pub file: String,
    /// Line number, starting at 1.
    pub line: usize,
    /// Column number (in characters), starting at 1.
    pub column: usize,
    /// How many characters the caret underlines (at least 1).
    pub width: usize,
    /// The full text of the line, for quoting.
    pub line_text: String,
}

/// Errors of the pipeline SQL front end.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The pipeline text is malformed or does not make sense (a user error, never retried).
    #[error("{}", render(.message, .at.as_ref(), .hint.as_deref()))]
    Invalid {
        /// What is wrong.
        message: String,
        /// Where it is, when known.
        at: Option<SourceLocation>,
        /// What to do about it.
        hint: Option<String>,
    },
    /// A pipeline file could not be read.
    #[error("cannot read pipeline file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A bug in Sluice: an invariant of the front end did not hold.
    #[error("internal error (a bug in sluice, please report it): {0}")]
    Internal(String),
}

impl SqlError {
    /// A user error at a known place with an optional hint.
    pub fn invalid(message: impl Into<String>, at: Option<SourceLocation>, hint: Option<String>) -> Self {
        SqlError::Invalid {
            message: message.into(),
            at,
            hint,
        }
    }

    /// The location of the error, when it has one.
    pub fn location(&self) -> Option<&SourceLocation> {
        match self {
            SqlError::Invalid { at, .. } => at.as_ref(),
            _ => None,
        }
    }
}

/// Renders `file:line:col: error: message`, the quoted line with a caret, and `help: hint`.
fn render(message: &str, at: Option<&SourceLocation>, hint: Option<&str>) -> String {
    let mut out = String::new();
    match at {
        Some(at) => {
            let gutter = at.line.to_string().len();
            let pad = " ".repeat(gutter);
            out.push_str(&format!("{}:{}:{}: error: {message}\n", at.file, at.line, at.column));
            out.push_str(&format!("{pad} |\n{} | {}\n", at.line, at.line_text));
            let lead: String = at
                .line_text
                .chars()
                .take(at.column.saturating_sub(1))
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            out.push_str(&format!("{pad} | {lead}{}", "^".repeat(at.width.max(1))));
        }
        None => out.push_str(&format!("error: {message}")),
    }
    if let Some(hint) = hint {
        out.push_str(&format!("\nhelp: {hint}"));
    }
    out
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Returns the candidate closest to `word` (case-insensitive edit distance), if it is close enough
/// to be a plausible typo.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let w = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&w, &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= (c.len().max(w.len()) / 3).max(1) && *d > 0)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_caret_under_column() {
        let e = SqlError::invalid(
            "unknown column \"amout\"",
            Some(SourceLocation {
                file: "p.sql".into(),
                line: 12,
                column: 8,
                width: 5,
                line_text: "SELECT amout FROM orders".into(),
            }),
            Some("did you mean \"amount\"?".into()),
        );
        let text = e.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "p.sql:12:8: error: unknown column \"amout\"");
        assert_eq!(lines[2], "12 | SELECT amout FROM orders");
        assert_eq!(lines[3], "   |        ^^^^^");
        assert_eq!(lines[4], "help: did you mean \"amount\"?");
    }

    #[test]
    fn nearest_finds_typos_only() {
        assert_eq!(nearest("amout", ["amount", "currency"]), Some("amount"));
        assert_eq!(nearest("zzz", ["amount", "currency"]), None);
        assert_eq!(nearest("amount", ["amount"]), None);
    }
}
