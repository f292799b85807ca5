//! The flat-object scanner: one pass over a line holding a single JSON object whose values are
//! all scalars and whose strings hold no escapes — the shape nearly every event producer writes.
//!
//! It reads each byte once and hands out borrowed slices; it checks the JSON grammar strictly
//! (whitespace, number syntax, literals, nothing after the object) and gives up on anything
//! else — an escape, a control byte in a string, a nested value, any syntax error — so the
//! caller can try a general parser. Giving up is never an error of the record.

/// One scalar value of a flat object, as written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Token<'a> {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A string's contents.
    Str(&'a str),
    /// A number's text, valid by the JSON grammar.
    Num(&'a str),
}

/// The line is not a flat object of unescaped scalars (it may still be valid JSON).
#[derive(Debug)]
pub(crate) struct NotFlat;

/// Receives the members of a flat object, and says which key it expects next.
pub(crate) trait Members<'a> {
    /// The key likely to come next. When the text holds exactly this key it is not read byte by
    /// byte nor compared again: the member goes to [`Members::hinted`]. The text is still
    /// checked, but a hint must be a plain key (no `"`, `\\` or control byte) to be matched.
    fn hint(&self) -> Option<&[u8]>;
    /// A member whose key is the hint.
    fn hinted(&mut self, value: Token<'a>);
    /// Any other member.
    fn member(&mut self, key: &'a str, value: Token<'a>);
}

/// Scans `line` as one flat JSON object, calling `member` with each key and value in order.
#[cfg(test)]
pub(crate) fn scan_flat<'a>(line: &'a str, member: impl FnMut(&'a str, Token<'a>)) -> Result<(), NotFlat> {
    struct Each<F>(F);
    impl<'a, F: FnMut(&'a str, Token<'a>)> Members<'a> for Each<F> {
        fn hint(&self) -> Option<&[u8]> {
            None
        }
        fn hinted(&mut self, _: Token<'a>) {}
        fn member(&mut self, key: &'a str, value: Token<'a>) {
            (self.0)(key, value)
        }
    }
    scan_members(line, &mut Each(member))
}

/// Scans `line` as one flat JSON object, reporting each member in order to `to`.
pub(crate) fn scan_members<'a>(line: &'a str, to: &mut impl Members<'a>) -> Result<(), NotFlat> {
    let mut s = Scanner {
        b: line.as_bytes(),
        line,
        at: 0,
    };
    s.blanks();
    s.expect(b'{')?;
    s.blanks();
    if s.peek() == Some(b'}') {
        s.at += 1;
    } else {
        loop {
            s.expect(b'"')?;
            // `None`: the hinted key, taken on sight.
            let key = match to.hint() {
                Some(h) if s.is_key(h) => {
                    s.at += h.len() + 1;
                    None
                }
                _ => Some(s.string()?),
            };
            s.blanks();
            s.expect(b':')?;
            s.blanks();
            let value = s.value()?;
            match key {
                None => to.hinted(value),
                Some(key) => to.member(key, value),
            }
            s.blanks();
            match s.next() {
                Some(b',') => s.blanks(),
                Some(b'}') => break,
                _ => return Err(NotFlat),
            }
        }
    }
    s.blanks();
    if s.at == s.b.len() { Ok(()) } else { Err(NotFlat) }
}

struct Scanner<'a> {
    b: &'a [u8],
    line: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.at += 1;
        c
    }

    fn expect(&mut self, c: u8) -> Result<(), NotFlat> {
        if self.next() == Some(c) { Ok(()) } else { Err(NotFlat) }
    }

    /// True when the text at the cursor is `key` and the closing quote (`key` being plain).
    fn is_key(&self, key: &[u8]) -> bool {
        self.b.get(self.at..self.at + key.len()) == Some(key) && self.b.get(self.at + key.len()) == Some(&b'"')
    }

    /// Skips JSON whitespace (space, tab, CR, LF — nothing else).
    fn blanks(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.at += 1;
        }
    }

    /// The rest of a string whose opening quote was read; no escapes, no control bytes.
    fn string(&mut self) -> Result<&'a str, NotFlat> {
        let start = self.at;
        loop {
            match self.next() {
                Some(b'"') => break,
                Some(b'\\') | None => return Err(NotFlat),
                Some(c) if c < 0x20 => return Err(NotFlat),
                Some(_) => {}
            }
        }
        // Both ends sit next to an ASCII quote, so they are character boundaries.
        self.line.get(start..self.at - 1).ok_or(NotFlat)
    }

    fn value(&mut self) -> Result<Token<'a>, NotFlat> {
        match self.peek() {
            Some(b'"') => {
                self.at += 1;
                Ok(Token::Str(self.string()?))
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true", Token::Bool(true)),
            Some(b'f') => self.literal(b"false", Token::Bool(false)),
            Some(b'n') => self.literal(b"null", Token::Null),
            _ => Err(NotFlat),
        }
    }

    fn literal(&mut self, word: &[u8], token: Token<'a>) -> Result<Token<'a>, NotFlat> {
        if self.b[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(token)
        } else {
            Err(NotFlat)
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Result<Token<'a>, NotFlat> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.next() {
            Some(b'0') => {}
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(NotFlat),
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.some_digits()?;
        }
        self.line.get(start..self.at).map(Token::Num).ok_or(NotFlat)
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
    }

    fn some_digits(&mut self) -> Result<(), NotFlat> {
        let start = self.at;
        self.digits();
        if self.at > start { Ok(()) } else { Err(NotFlat) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(line: &str) -> Option<Vec<(&str, Token<'_>)>> {
        let mut out = Vec::new();
        scan_flat(line, |k, v| out.push((k, v))).ok()?;
        Some(out)
    }

    #[test]
    fn reads_flat_objects() {
        assert_eq!(
            members(r#" {"a": 1, "b":"x y","c" :true,"d":null,"e":-0.5e+3,"f":false} "#),
            Some(vec![
                ("a", Token::Num("1")),
                ("b", Token::Str("x y")),
                ("c", Token::Bool(true)),
                ("d", Token::Null),
                ("e", Token::Num("-0.5e+3")),
                ("f", Token::Bool(false)),
            ])
        );
        assert_eq!(members("{}"), Some(vec![]));
        assert_eq!(members("{\"é\":\"ü\"}"), Some(vec![("é", Token::Str("ü"))]));
    }

    #[test]
    fn gives_up_on_anything_else() {
        for line in [
            "",
            "{",
            "{\"a\":1",
            "{\"a\":1,}",
            "{,}",
            "{\"a\" 1}",
            "{a:1}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":.5}",
            "{\"a\":+1}",
            "{\"a\":-}",
            "{\"a\":1e}",
            "{\"a\":1x}",
            "{\"a\":tru}",
            "{\"a\":nul}",
            "{\"a\":truex}",
            "{\"a\":\"\\n\"}",
            "{\"a\\u0041\":1}",
            "{\"a\":\"\t\"}",
            "{\"a\":[1]}",
            "{\"a\":{}}",
            "{\"a\":1}x",
            "{\"a\":1}{}",
            "\u{feff}{}",
            "{\"a\":1}\u{a0}",
            "[1]",
            "1",
            "{\"a\":NaN}",
        ] {
            assert!(members(line).is_none(), "{line:?} must not scan");
        }
    }
}
