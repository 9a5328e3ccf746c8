//! Streaming an answer's text: which part of the decoded text so far may be
//! sent now. An incomplete UTF-8 character at the end (decoded as U+FFFD) is
//! held back until it completes, and so is any suffix that could be the
//! start of a stop string; a stop string ends the text before it.

/// What to do after a token.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Update {
    /// Text to send now (may be empty).
    pub delta: String,
    /// A stop string starts at this byte of the text: the answer is the text before it.
    pub stop_at: Option<usize>,
}

/// The sent prefix of an answer and its stop strings.
#[derive(Debug)]
pub(crate) struct TextStream {
    stops: Vec<String>,
    sent: String,
}

impl TextStream {
    pub fn new(stops: &[String]) -> Self {
        TextStream { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), sent: String::new() }
    }

    /// The text sent so far.
    #[cfg(test)]
    pub fn sent(&self) -> &str {
        &self.sent
    }

    /// `full` is the whole answer decoded so far; `last` says no token follows
    /// (then nothing is held back but a stop string is still cut).
    pub fn update(&mut self, full: &str, last: bool) -> Update {
        let none = Update { delta: String::new(), stop_at: None };
        if !full.starts_with(self.sent.as_str()) {
            // Decoding changed text already sent (an image tag closed later):
            // send nothing more; the final text carries the answer.
            return none;
        }
        let from = self.sent.len();
        let stop_at = self.stops.iter().filter_map(|s| full[from..].find(s.as_str()).map(|i| from + i)).min();
        if let Some(p) = stop_at {
            let delta = full[from..p].to_string();
            self.sent.push_str(&delta);
            return Update { delta, stop_at: Some(p) };
        }
        let mut end = full.len();
        if !last {
            while full[..end].ends_with('\u{FFFD}') {
                end -= '\u{FFFD}'.len_utf8();
            }
            let mut hold = end;
            for s in &self.stops {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && full[..end].ends_with(&s[..k]) {
                        hold = hold.min(end - k);
                        break;
                    }
                }
            }
            end = hold;
        }
        if end <= from {
            return none;
        }
        let delta = full[from..end].to_string();
        self.sent.push_str(&delta);
        Update { delta, stop_at: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_incomplete_chars_and_stop_prefixes() {
        let mut t = TextStream::new(&["STOP".into(), "\n\n".into()]);
        assert_eq!(t.update("Hel", false).delta, "Hel");
        assert_eq!(t.update("Hello \u{FFFD}", false).delta, "lo ");
        assert_eq!(t.update("Hello é", false).delta, "é");
        // "ST" could start "STOP": held.
        assert_eq!(t.update("Hello éST", false).delta, "");
        assert_eq!(t.update("Hello éSTA", false).delta, "STA");
        assert_eq!(t.update("Hello éSTA\n", false).delta, "");
        let u = t.update("Hello éSTA\n\nmore", false);
        assert_eq!(u, Update { delta: String::new(), stop_at: Some(11) });
        assert_eq!(t.sent(), "Hello éSTA");
    }

    #[test]
    fn a_stop_string_inside_one_token_and_the_last_flush() {
        let mut t = TextStream::new(&["end".into()]);
        let u = t.update("the bend", false);
        assert_eq!(u, Update { delta: "the b".into(), stop_at: Some(5) });
        let mut t = TextStream::new(&["xyz".into()]);
        assert_eq!(t.update("abcx", false).delta, "abc");
        assert_eq!(t.update("abcx", true).delta, "x");
        let mut t = TextStream::new(&[]);
        assert_eq!(t.update("a\u{FFFD}", true).delta, "a\u{FFFD}");
    }
}
