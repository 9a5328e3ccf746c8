//! OpenAI-style messages → the prompt ids the reference `chat()` builds for
//! the same conversation (QWEN-VL.md §7), token for token.
//!
//! The conversation must read `[system] (user assistant)* user`: an optional
//! system message first (the default system message otherwise), then
//! alternating user and assistant messages, ending with the user message to
//! answer. Each user message's parts go through the reference
//! `from_list_format` in order: a picture becomes
//! `Picture k:<img>NAME</img>\n` (k counts from 1 within the message), a text
//! part is appended as is. Earlier user/assistant pairs become the history of
//! `make_context` (oldest dropped first to fit `max_window_size`); assistant
//! text, boxes included, is kept verbatim.

use crate::request::ImageInput;
use qvc_model::chat::{make_context, Turn};
use qvc_model::Model;

/// One part of a message's content.
#[derive(Clone, Debug)]
pub enum Part {
    Text(String),
    Image(ImageInput),
}

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Clone, Debug)]
pub struct Message {
    pub role: Role,
    pub parts: Vec<Part>,
}

impl Message {
    /// A message of one text part.
    pub fn text(role: Role, text: impl Into<String>) -> Message {
        Message { role, parts: vec![Part::Text(text.into())] }
    }
}

/// Why a conversation cannot become a prompt (each maps to an HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum ConversationError {
    #[error("the conversation has no messages")]
    Empty,
    #[error("messages[{index}]: a system message may only come first")]
    SystemNotFirst { index: usize },
    #[error("messages[{index}]: a {role} message cannot contain images (only user messages can)")]
    ImageNotAllowed { index: usize, role: &'static str },
    #[error("messages[{index}]: expected a {expected} message here (after the optional system message, user and assistant messages alternate, starting with user), got {got}")]
    Order { index: usize, expected: &'static str, got: &'static str },
    #[error("the last message must be a user message (the one to answer), got {got}")]
    LastNotUser { got: &'static str },
    #[error("messages[{index}]: image name {name:?} cannot be written in a prompt ({why})")]
    ImageName { index: usize, name: String, why: &'static str },
    #[error("the text contains {spans} <img>…</img> tag(s) but {images} picture(s) were given; send pictures as image parts, not as <img> tags in the text")]
    ImageTags { spans: usize, images: usize },
    #[error("cannot tokenize the conversation: {0}")]
    Tokenizer(#[from] qvc_model::tokenizer::TokenizerError),
}

/// Exactly the prompt the reference `chat()` builds (QWEN-VL.md §7) for this
/// conversation: the default system message when none is given; each user
/// message's parts through `from_list_format` (pictures numbered from 1 within
/// each message); earlier user/assistant pairs as history; assistant text
/// verbatim; the last message must be a user message. Returns the prompt ids
/// and the pictures whose spans are in the prompt, in prompt order (pictures
/// of history turns dropped to fit `max_window_size` are left out).
pub fn build_prompt(model: &Model, messages: &[Message]) -> Result<(Vec<u32>, Vec<ImageInput>), ConversationError> {
    if messages.is_empty() {
        return Err(ConversationError::Empty);
    }
    let (system, start) = match messages[0].role {
        Role::System => (text_only(&messages[0], 0)?, 1),
        _ => (qvc_model::chat::DEFAULT_SYSTEM.to_string(), 0),
    };
    let rest = &messages[start..];
    if let Some(last) = rest.last() {
        if last.role != Role::User {
            return Err(ConversationError::LastNotUser { got: last.role.as_str() });
        }
    } else {
        return Err(ConversationError::LastNotUser { got: "system" });
    }
    let mut texts = Vec::with_capacity(rest.len());
    let mut images: Vec<ImageInput> = Vec::new();
    for (j, m) in rest.iter().enumerate() {
        let index = start + j;
        let expected = if j % 2 == 0 { Role::User } else { Role::Assistant };
        if m.role == Role::System {
            return Err(ConversationError::SystemNotFirst { index });
        }
        if m.role != expected {
            return Err(ConversationError::Order { index, expected: expected.as_str(), got: m.role.as_str() });
        }
        texts.push(match m.role {
            Role::User => from_list_format(m, index, &mut images)?,
            _ => text_only(m, index)?,
        });
    }
    let query = texts.pop().expect("the last message is a user message");
    let history: Vec<Turn> =
        texts.chunks_exact(2).map(|p| Turn { query: p[0].clone(), response: p[1].clone() }).collect();
    let tok = &model.tokenizer;
    let ids = make_context(tok, &system, &history, &query, model.generation.max_window_size)?;
    // Every <img> tag must be one of the given pictures (a tag typed in a
    // text part would take a picture's place).
    let tags: usize = texts.iter().chain(std::iter::once(&query)).map(|t| t.matches("<img>").count()).sum();
    if tags != images.len() {
        return Err(ConversationError::ImageTags { spans: tags, images: images.len() });
    }
    // Turns dropped to fit the window are the oldest: the kept pictures are the last ones.
    let spans = tok.image_spans(&ids)?;
    if spans.len() > images.len() {
        return Err(ConversationError::ImageTags { spans: spans.len(), images: images.len() });
    }
    let kept = images.split_off(images.len() - spans.len());
    Ok((ids, kept))
}

/// The text of a message that may hold only text parts (system, assistant).
fn text_only(m: &Message, index: usize) -> Result<String, ConversationError> {
    let mut s = String::new();
    for p in &m.parts {
        match p {
            Part::Text(t) => s.push_str(t),
            Part::Image(_) => return Err(ConversationError::ImageNotAllowed { index, role: m.role.as_str() }),
        }
    }
    Ok(s)
}

/// The reference `from_list_format`: pictures as `Picture k:<img>NAME</img>\n`, text as is, in order.
fn from_list_format(m: &Message, index: usize, images: &mut Vec<ImageInput>) -> Result<String, ConversationError> {
    let mut s = String::new();
    let mut k = 0;
    for p in &m.parts {
        match p {
            Part::Text(t) => s.push_str(t),
            Part::Image(img) => {
                let bad = |why| ConversationError::ImageName { index, name: img.name.clone(), why };
                if img.name.is_empty() {
                    return Err(bad("it is empty"));
                }
                if img.name.len() > 256 {
                    return Err(bad("it is longer than 256 bytes"));
                }
                if img.name.contains('<') || img.name.contains('>') {
                    return Err(bad("it contains < or >"));
                }
                k += 1;
                s.push_str(&format!("Picture {k}:<img>{}</img>\n", img.name));
                images.push(img.clone());
            }
        }
    }
    Ok(s)
}
