//! The text of a pipeline file: its tokens with positions, the statements they form, and the
//! conversion from parser spans to quoted [`SourceLocation`]s.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Location, Span, Token, TokenWithSpan, Tokenizer};

use crate::error::{SourceLocation, SqlError};

/// One pipeline file: its name (for messages), its text, and its tokens.
#[derive(Debug, Clone)]
pub struct PipelineText {
    /// The name used in messages (usually the path given on the command line).
    pub file: String,
    /// The file's text.
    pub text: String,
    tokens: Vec<TokenWithSpan>,
}

/// The tokens of one statement (without the trailing `;` and leading whitespace).
#[derive(Debug, Clone, Copy)]
pub struct StatementTokens<'a> {
    /// The non-whitespace tokens of the statement.
    pub tokens: &'a [TokenWithSpan],
}

impl PipelineText {
    /// Tokenizes `text`; a tokenizer error (an unterminated string, say) is reported with its place.
    pub fn new(file: impl Into<String>, text: impl Into<String>) -> Result<Self, SqlError> {
        let file = file.into();
        let text = text.into();
        let tokens = Tokenizer::new(&GenericDialect {}, &text)
            .tokenize_with_location()
            .map_err(|e| {
                let loc = e.location;
                let this = PipelineText {
                    file: file.clone(),
                    text: text.clone(),
                    tokens: vec![],
                };
                SqlError::invalid(strip_position(&e.message), this.locate_at(loc, 1), None)
            })?
            .into_iter()
            .filter(|t| !matches!(t.token, Token::Whitespace(_)))
            .collect();
        Ok(PipelineText { file, text, tokens })
    }

    /// The statements of the file, in order; empty statements (`;;`) are skipped, as DFParser does.
    pub fn statements(&self) -> Vec<StatementTokens<'_>> {
        let mut out = Vec::new();
        let mut start = 0;
        for (i, t) in self.tokens.iter().enumerate() {
            if matches!(t.token, Token::SemiColon | Token::EOF) {
                if i > start {
                    out.push(StatementTokens {
                        tokens: &self.tokens[start..i],
                    });
                }
                start = i + 1;
            }
        }
        if start < self.tokens.len() {
            out.push(StatementTokens {
                tokens: &self.tokens[start..],
            });
        }
        out
    }

    /// The byte offset of a tokenizer location (1-based line, column in characters).
    pub fn offset(&self, at: Location) -> Option<usize> {
        let mut line_start = 0;
        for _ in 1..at.line {
            line_start += self.text[line_start..].find('\n')? + 1;
        }
        let line = &self.text[line_start..];
        let col = (at.column as usize).saturating_sub(1);
        match line.char_indices().nth(col) {
            Some((i, _)) => Some(line_start + i),
            None => Some(line_start + line.len()),
        }
    }

    /// A location for a parser span (1-based line/column from the tokenizer).
    pub fn locate(&self, span: Span) -> Option<SourceLocation> {
        let width = if span.end.line == span.start.line && span.end.column > span.start.column {
            (span.end.column - span.start.column) as usize
        } else {
            1
        };
        self.locate_at(span.start, width)
    }

    /// A location for a start position and a caret width.
    pub fn locate_at(&self, at: Location, width: usize) -> Option<SourceLocation> {
        if at.line == 0 {
            return None;
        }
        let line_text = self.text.lines().nth(at.line as usize - 1)?.to_string();
        Some(SourceLocation {
            file: self.file.clone(),
            line: at.line as usize,
            column: at.column.max(1) as usize,
            width: width.max(1),
            line_text,
        })
    }

    /// Finds a position written into a parser message as `at Line: L, Column: C`.
    pub fn locate_message(&self, message: &str) -> Option<SourceLocation> {
        let idx = message.rfind("Line: ")?;
        let rest = &message[idx + 6..];
        let (line, rest) = rest.split_once(", Column: ")?;
        let col: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let at = Location {
            line: line.trim().parse().ok()?,
            column: col.parse().ok()?,
        };
        // Width: the token that starts there, if any.
        let width = self
            .tokens
            .iter()
            .find(|t| t.span.start == at)
            .map(token_width)
            .unwrap_or(1);
        self.locate_at(at, width)
    }
}

/// Removes the `at Line: .., Column: ..` suffix that sqlparser appends to messages.
pub fn strip_position(message: &str) -> String {
    let m = match message.find(" at Line: ") {
        Some(i) => &message[..i],
        None => message,
    };
    m.strip_prefix("SQL error: ")
        .unwrap_or(m)
        .strip_prefix("ParserError(\"")
        .map_or_else(|| m.to_string(), |s| s.trim_end_matches("\")").to_string())
}

fn token_width(t: &TokenWithSpan) -> usize {
    if t.span.start.line == t.span.end.line && t.span.end.column > t.span.start.column {
        (t.span.end.column - t.span.start.column) as usize
    } else {
        1
    }
}

impl<'a> StatementTokens<'a> {
    /// The span of the whole first token (statement start).
    pub fn first_span(&self) -> Span {
        self.tokens.first().map(|t| t.span).unwrap_or(Span::empty())
    }

    /// The span of the first token that is the keyword `kw`.
    pub fn keyword(&self, kw: Keyword) -> Option<Span> {
        self.tokens.iter().find(|t| is_keyword(t, kw)).map(|t| t.span)
    }

    /// The span of the token right after the first keyword `kw` (e.g. the name after `AS`).
    pub fn after_keyword(&self, kw: Keyword) -> Option<Span> {
        let i = self.tokens.iter().position(|t| is_keyword(t, kw))?;
        self.tokens.get(i + 1).map(|t| t.span)
    }

    /// The span of the first quoted string equal to `value` after keyword `kw`.
    pub fn string_after(&self, kw: Keyword, value: &str) -> Option<Span> {
        let i = self.tokens.iter().position(|t| is_keyword(t, kw))?;
        self.tokens[i..]
            .iter()
            .find(|t| matches!(&t.token, Token::SingleQuotedString(s) | Token::DoubleQuotedString(s) if s == value))
            .map(|t| t.span)
    }

    /// The span of the first word (identifier) equal to `name` (case-insensitive) after keyword `kw`.
    pub fn word_after(&self, kw: Keyword, name: &str) -> Option<Span> {
        let i = self.tokens.iter().position(|t| is_keyword(t, kw))?;
        self.tokens[i..]
            .iter()
            .find(|t| matches!(&t.token, Token::Word(w) if w.value.eq_ignore_ascii_case(name)))
            .map(|t| t.span)
    }

    /// The span of the option key `key` inside `OPTIONS (...)`, quoted or not.
    pub fn option_key(&self, key: &str) -> Option<Span> {
        self.string_after(Keyword::OPTIONS, key).or_else(|| {
            let first = key.split('.').next().unwrap_or(key);
            self.word_after(Keyword::OPTIONS, first)
        })
    }

    /// The span of the value that follows option key `key` inside `OPTIONS (...)`.
    pub fn option_value(&self, key: &str) -> Option<Span> {
        let key_span = self.option_key(key)?;
        let i = self.tokens.iter().position(|t| t.span == key_span)?;
        self.tokens[i + 1..]
            .iter()
            .find(|t| !matches!(t.token, Token::Period | Token::Word(_)) || i + 1 == self.tokens.len())
            .map(|t| t.span)
    }
}

fn is_keyword(t: &TokenWithSpan, kw: Keyword) -> bool {
    matches!(&t.token, Token::Word(w) if w.keyword == kw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_statements_and_skips_empty_ones() {
        let t = PipelineText::new("f.sql", "SELECT 1;;\n-- c\nSELECT 2; ").unwrap();
        let s = t.statements();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].first_span().start.line, 3);
    }

    #[test]
    fn locates_option_keys() {
        let sql = "CREATE EXTERNAL TABLE t STORED AS X LOCATION 'a'\nOPTIONS ('bogus' '1')";
        let t = PipelineText::new("f.sql", sql).unwrap();
        let s = t.statements();
        let loc = t.locate(s[0].option_key("bogus").unwrap()).unwrap();
        assert_eq!((loc.line, loc.column, loc.width), (2, 10, 7));
    }

    #[test]
    fn reads_positions_from_parser_messages() {
        let t = PipelineText::new("f.sql", "SELECT\n  1 FROM").unwrap();
        let loc = t
            .locate_message("Expected: x, found: FROM at Line: 2, Column: 5")
            .unwrap();
        assert_eq!((loc.line, loc.column, loc.width), (2, 5, 4));
    }
}
