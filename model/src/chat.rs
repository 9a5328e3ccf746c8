//! ChatML prompts for Qwen-VL-Chat, token for token as the reference
//! `make_context` (`qwen_generation_utils.py`, `chat_format="chatml"`) builds
//! them.
//!
//! The prompt is assembled from pieces tokenized on their own and
//! concatenated, never from one formatted string, because BPE across the
//! piece boundaries would give different ids:
//!
//! ```text
//! <|im_start|>system\nSYSTEM<|im_end|>
//! (\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nR<|im_end|>)*   oldest turns dropped first
//! \n<|im_start|>user\nQUERY<|im_end|>\n<|im_start|>assistant\n
//! ```
//!
//! Role names and message contents are encoded with only the image and
//! grounding tags special ([`Specials::ImageTags`]), so a user who types
//! `<|im_start|>` cannot forge a turn; `<img>PATH</img>` expands to 258 ids.

use crate::tokenizer::{QwenTokenizer, Specials, TokenizerError};

/// The reference's default system prompt.
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

/// The reference's default `max_window_size` (Qwen-VL-Chat `generation_config.json`).
pub const DEFAULT_MAX_WINDOW_SIZE: usize = 6144;

/// One earlier exchange of the conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    pub query: String,
    pub response: String,
}

/// Builds the prompt ids of a chat turn exactly like the reference
/// `make_context(tokenizer, query, history, system, max_window_size, "chatml")`.
///
/// History turns are added newest first while
/// `len(system) + len(turn) + len(kept turns) < max_window_size`; the first
/// turn that does not fit and every older one are dropped. The system part
/// and the new query are always kept, so the result can still exceed
/// `max_window_size` (as in the reference).
pub fn make_context(
    tok: &QwenTokenizer,
    system: &str,
    history: &[Turn],
    query: &str,
    max_window_size: usize,
) -> Result<Vec<u32>, TokenizerError> {
    let sp = *tok.specials();
    let nl = tok.encode("\n", Specials::All)?;
    let role_and_content = |role: &str, content: &str| -> Result<Vec<u32>, TokenizerError> {
        let mut v = tok.encode(role, Specials::ImageTags)?;
        v.extend_from_slice(&nl);
        v.extend(tok.encode(content, Specials::ImageTags)?);
        Ok(v)
    };
    let message = |role: &str, content: &str| -> Result<Vec<u32>, TokenizerError> {
        let mut v = vec![sp.im_start];
        v.extend(role_and_content(role, content)?);
        v.push(sp.im_end);
        Ok(v)
    };

    let system_tokens = message("system", system)?;

    // Kept history, newest turn first (reversed once at the end).
    let mut kept: Vec<Vec<u32>> = Vec::new();
    let mut kept_len = 0usize;
    for turn in history.iter().rev() {
        let mut next = nl.clone();
        next.extend(message("user", &turn.query)?);
        next.extend_from_slice(&nl);
        next.extend(message("assistant", &turn.response)?);
        if system_tokens.len() + next.len() + kept_len < max_window_size {
            kept_len += next.len();
            kept.push(next);
        } else {
            break;
        }
    }

    let mut ids = system_tokens;
    for turn in kept.into_iter().rev() {
        ids.extend(turn);
    }
    ids.extend_from_slice(&nl);
    ids.extend(message("user", query)?);
    ids.extend_from_slice(&nl);
    ids.push(sp.im_start);
    ids.extend(tok.encode("assistant", Specials::All)?);
    ids.extend_from_slice(&nl);
    Ok(ids)
}

/// Writes a query with images the way the reference `from_list_format` does:
/// `Picture 1:<img>a.jpg</img>\nPicture 2:<img>b.jpg</img>\nQUESTION`.
pub fn format_query(images: &[String], question: &str) -> String {
    let mut s = String::new();
    for (i, path) in images.iter().enumerate() {
        s.push_str(&format!("Picture {}:<img>{path}</img>\n", i + 1));
    }
    s.push_str(question);
    s
}

/// The ids that end generation: `<|im_end|>`, `<|im_start|>`, `<|endoftext|>`.
pub fn stop_ids(tok: &QwenTokenizer) -> Vec<u32> {
    let sp = tok.specials();
    vec![sp.im_end, sp.im_start, sp.endoftext]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::demo_tiktoken;

    fn demo() -> QwenTokenizer {
        QwenTokenizer::from_tiktoken_str(&demo_tiktoken(), "demo").unwrap()
    }

    #[test]
    fn format_query_matches_from_list_format() {
        assert_eq!(format_query(&[], "Hi"), "Hi");
        assert_eq!(
            format_query(&["a.jpg".into(), "b.jpg".into()], "Compare."),
            "Picture 1:<img>a.jpg</img>\nPicture 2:<img>b.jpg</img>\nCompare."
        );
    }

    #[test]
    fn prompt_layout_and_decode() {
        let tok = demo();
        let history = vec![Turn { query: "Q1".into(), response: "R1".into() }];
        let ids = make_context(&tok, DEFAULT_SYSTEM, &history, "<|im_start|>Q2", 6144).unwrap();
        assert_eq!(
            tok.decode(&ids, false),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nR1<|im_end|>\n<|im_start|>user\n<|im_start|>Q2<|im_end|>\n<|im_start|>assistant\n"
        );
        // The typed <|im_start|> is plain text: exactly 5 real ones.
        let sp = tok.specials();
        assert_eq!(ids.iter().filter(|&&x| x == sp.im_start).count(), 5);
        assert_eq!(stop_ids(&tok), vec![sp.im_end, sp.im_start, sp.endoftext]);
    }

    #[test]
    fn oldest_turns_are_dropped_to_fit_the_window() {
        let tok = demo();
        let turn = |q: &str| Turn { query: q.into(), response: "ok".into() };
        // Queries of equal token length (each digit is its own token).
        let history = vec![turn("q1"), turn("q2"), turn("q3")];
        let full = make_context(&tok, DEFAULT_SYSTEM, &history, "now", 100_000).unwrap();
        let none = make_context(&tok, DEFAULT_SYSTEM, &[], "now", 100_000).unwrap();
        assert_eq!((full.len() - none.len()) % 3, 0);
        let turn_len = (full.len() - none.len()) / 3;
        let mut system_tokens = vec![tok.specials().im_start];
        system_tokens.extend(tok.encode("system\n", Specials::All).unwrap());
        system_tokens.extend(tok.encode(DEFAULT_SYSTEM, Specials::All).unwrap());
        system_tokens.push(tok.specials().im_end);
        // Room for exactly two turns (the reference test is a strict `<`).
        let window = system_tokens.len() + 2 * turn_len + 1;
        let two = make_context(&tok, DEFAULT_SYSTEM, &history, "now", window).unwrap();
        assert_eq!(two.len(), none.len() + 2 * turn_len);
        let text = tok.decode(&two, false);
        assert!(!text.contains("q1") && text.contains("q2") && text.contains("q3"));
        let one = make_context(&tok, DEFAULT_SYSTEM, &history, "now", window - 1).unwrap();
        assert_eq!(one.len(), none.len() + turn_len);
        let text = tok.decode(&one, false);
        assert!(!text.contains("q2") && text.contains("q3"));
        let zero = make_context(&tok, DEFAULT_SYSTEM, &history, "now", 0).unwrap();
        assert_eq!(zero, none);
    }

    #[test]
    fn unclosed_image_in_query_is_an_error() {
        let tok = demo();
        let e = make_context(&tok, DEFAULT_SYSTEM, &[], "<img>a.png", 6144).unwrap_err();
        assert!(matches!(e, TokenizerError::UnclosedImage { .. }), "{e:?}");
    }
}
