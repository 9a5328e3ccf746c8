//! The Qwen-VL tokenizer: byte-level BPE over the ranks of `qwen.tiktoken`,
//! the 217 special tokens, and the `<img>PATH</img>` expansion.
//!
//! The reference is `tokenization_qwen.py` of Qwen-VL-Chat, which runs
//! tiktoken. To be exact by construction this module implements tiktoken's
//! algorithm itself rather than translating the ranks into a merges list:
//!
//! 1. the text is NFC-normalised (`tokenizers`' normaliser);
//! 2. it is cut at the special-token surface forms that are *allowed*
//!    ([`Specials`]): every one for a plain `encode`, only the image and
//!    grounding tags inside chat turns;
//! 3. each plain piece is split by the Qwen regex (fancy-regex, through
//!    `tokenizers::utils::SysRegex`) and every regex piece is byte-pair merged:
//!    repeatedly join the adjacent pair whose concatenation has the lowest
//!    rank (leftmost on ties) until no pair is a token. Long pieces use a heap
//!    so that pathological inputs (a megabyte of one letter) stay
//!    `O(n log n)` instead of quadratic;
//! 4. `<img>PATH</img>` becomes `<img>`, one id per UTF-8 byte of PATH equal to
//!    the byte value, `<imgpad>` up to 256 slots, `</img>`: 258 ids.
//!
//! Loading parses 151,643 base64 lines into a hash map and costs tens of
//! milliseconds in release builds; no merges table is built.
//!
//! Decoding concatenates token bytes and replaces invalid UTF-8 with U+FFFD
//! (Python's `errors="replace"`); image spans decode back to `<img>PATH</img>`.
//! [`QwenTokenizer::image_spans`] is the model's inverse of the expansion: it
//! finds each image span in a prompt and reads PATH back from the ids.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};

use tokenizers::utils::SysRegex;
use tokenizers::NormalizedString;

/// The Qwen pre-tokenizer regex (tiktoken `pat_str` of `tokenization_qwen.py`).
pub const QWEN_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Number of token slots between `<img>` and `</img>` (path bytes, then pads).
pub const IMG_TOKEN_SPAN: usize = 256;

/// Number of `<|extra_N|>` tokens.
const N_EXTRA: usize = 205;

/// The image and grounding tags, in id order, after the `<|...|>` tokens.
const IMAGE_TAGS: [&str; 9] =
    ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"];

/// Pieces at least this long are merged with the heap algorithm.
const HEAP_THRESHOLD: usize = 128;

/// Which special-token surface forms in the text become special tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Specials {
    /// Every special surface form (`<|endoftext|>`, `<|im_start|>`, …,
    /// `<img>`, …) is a special token: the reference `tokenizer.encode` default.
    All,
    /// Only `<img> </img> <imgpad> <ref> </ref> <box> </box> <quad> </quad>`
    /// are special; `<|im_start|>` typed by a user is plain text. This is what
    /// `make_context` uses for role names and message content.
    ImageTags,
}

/// Errors of loading the vocabulary, encoding text and reading image spans.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read the tokenizer vocabulary {path}: {source} (pass the checkpoint's qwen.tiktoken)", path = .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg} (a tiktoken vocabulary has one `BASE64TOKEN RANK` pair per line; is this the checkpoint's qwen.tiktoken?)")]
    Parse { path: String, line: usize, msg: String },
    #[error("invalid tokenizer vocabulary {path}: {msg}")]
    Vocab { path: String, msg: String },
    #[error("unclosed image tag: the `<img>` at byte {offset} of the (NFC-normalised) text has no matching `</img>`; write images as <img>PATH</img>")]
    UnclosedImage { offset: usize },
    #[error("the image path between <img> and </img> is {len} bytes long in UTF-8, but at most 256 bytes fit in an image span; use a shorter (e.g. relative) path")]
    ImagePathTooLong { len: usize },
    #[error("the image path between <img> and </img> contains the special token `{token}`; only a file path may appear there")]
    ImagePathSpecial { token: String },
    #[error("the pre-tokenizer regex stopped at byte {offset} of a {len}-byte text piece (fancy-regex backtracking limit?); split the text into smaller parts")]
    Pretokenize { offset: usize, len: usize },
    #[error("token {pos} is <img> but no </img> follows it before the next <img> or the end of the prompt; build prompts with the tokenizer so each image becomes 258 tokens")]
    UnclosedImageSpan { pos: usize },
    #[error("token {pos} is </img> without an <img> before it; build prompts with the tokenizer so each image becomes 258 tokens")]
    UnopenedImageSpan { pos: usize },
    #[error("the image span from <img> at token {start} to </img> at token {end} holds {len} tokens, but the model needs exactly 256 (path bytes, then <imgpad>); build prompts with the tokenizer")]
    ImageSpanLength { start: usize, end: usize, len: usize },
    #[error("the image span at token {start} holds id {id} at token {pos}, which is neither a path byte (0-255) nor <imgpad>")]
    ImagePathToken { start: usize, pos: usize, id: u32 },
    #[error("the image span at token {start} has an empty path; write images as <img>PATH</img> with the file's path")]
    EmptyImagePath { start: usize },
    #[error("the image span at token {start} holds a path that is not valid UTF-8: {path_lossy:?}")]
    ImagePathUtf8 { start: usize, path_lossy: String },
}

/// Ids of the special tokens the engine needs by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialIds {
    pub endoftext: u32,
    pub im_start: u32,
    pub im_end: u32,
    pub ref_start: u32,
    pub ref_end: u32,
    pub box_start: u32,
    pub box_end: u32,
    pub quad_start: u32,
    pub quad_end: u32,
    pub img_start: u32,
    pub img_end: u32,
    pub img_pad: u32,
}

/// One image in a token sequence: `ids[start]` is `<img>`, `ids[end]` is
/// `</img>`, and the 256 positions `start+1 .. end` receive the image features.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpan {
    pub start: usize,
    pub end: usize,
    pub path: String,
}

/// A fast non-cryptographic hasher (FxHash) for the byte-string → rank map.
#[derive(Default, Clone, Copy)]
struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8-byte chunk")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf) ^ ((rest.len() as u64) << 56));
        }
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The Qwen tokenizer. Cheap to share (`&self` everywhere, `Send + Sync`).
pub struct QwenTokenizer {
    /// Token bytes → rank (= id).
    encoder: FxMap<Box<[u8]>, u32>,
    /// Bytes of rank `r` are `bytes[offsets[r]..offsets[r + 1]]`.
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    /// Surface forms of the special tokens; id = `n_ranks + index`.
    special_names: Vec<String>,
    /// Surface form → id, for every special token.
    special_lookup: FxMap<Box<str>, u32>,
    /// Distinct surface-form lengths, longest first.
    special_lens: Vec<usize>,
    specials: SpecialIds,
    regex: SysRegex,
}

impl std::fmt::Debug for QwenTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenTokenizer")
            .field("n_ranks", &self.n_ranks())
            .field("n_vocab", &self.n_vocab())
            .field("specials", &self.specials)
            .finish()
    }
}

/// One piece of text after cutting at the allowed special tokens.
enum Segment<'a> {
    Text(&'a str),
    Special { id: u32, offset: usize },
}

impl QwenTokenizer {
    /// Reads a tiktoken vocabulary (`qwen.tiktoken`).
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let contents =
            std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
        Self::from_tiktoken_str(&contents, &path.display().to_string())
    }

    /// Parses tiktoken-format contents (`BASE64TOKEN RANK` per line, empty
    /// lines ignored). `origin` names the source in error messages. The ranks
    /// must be exactly `0..N` and every single byte must be a token; special
    /// tokens get ids `N, N+1, …` in the order of the reference.
    pub fn from_tiktoken_str(contents: &str, origin: &str) -> Result<Self, TokenizerError> {
        let parse_err = |line: usize, msg: String| TokenizerError::Parse { path: origin.to_string(), line, msg };
        let n_lines_hint = contents.len() / 12 + 16;
        let mut encoder: FxMap<Box<[u8]>, u32> = FxMap::with_capacity_and_hasher(n_lines_hint, Default::default());
        // rank -> (line number, bytes), filled as ranks come.
        let mut by_rank: Vec<Option<(usize, Box<[u8]>)>> = Vec::with_capacity(n_lines_hint);
        let mut scratch = Vec::with_capacity(64);
        for (i, line) in contents.lines().enumerate() {
            let lineno = i + 1;
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split_ascii_whitespace();
            let (Some(b64), rank_str, None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(parse_err(lineno, format!("expected two fields `BASE64TOKEN RANK`, found {line:?}")));
            };
            let Some(rank_str) = rank_str else {
                return Err(parse_err(lineno, format!("missing rank after the token {b64:?}")));
            };
            let rank: u32 = rank_str
                .parse()
                .map_err(|_| parse_err(lineno, format!("rank {rank_str:?} is not a non-negative integer")))?;
            if rank >= u32::MAX / 2 {
                return Err(parse_err(lineno, format!("rank {rank} is too large")));
            }
            scratch.clear();
            base64_decode(b64, &mut scratch)
                .map_err(|msg| parse_err(lineno, format!("bad base64 token {b64:?}: {msg}")))?;
            if scratch.is_empty() {
                return Err(parse_err(lineno, "empty token".to_string()));
            }
            let token: Box<[u8]> = scratch.as_slice().into();
            let r = rank as usize;
            if by_rank.len() <= r {
                by_rank.resize(r + 1, None);
            }
            if let Some((first, _)) = &by_rank[r] {
                return Err(parse_err(lineno, format!("rank {rank} was already given on line {first}")));
            }
            if let Some(&other) = encoder.get(&token) {
                let first = by_rank[other as usize].as_ref().map_or(0, |(l, _)| *l);
                return Err(parse_err(
                    lineno,
                    format!("token {b64:?} was already given on line {first} (rank {other})"),
                ));
            }
            encoder.insert(token.clone(), rank);
            by_rank[r] = Some((lineno, token));
        }
        if by_rank.is_empty() {
            return Err(TokenizerError::Vocab {
                path: origin.to_string(),
                msg: "the file holds no tokens".to_string(),
            });
        }
        let mut bytes = Vec::with_capacity(by_rank.len() * 7);
        let mut offsets = Vec::with_capacity(by_rank.len() + 1);
        offsets.push(0u32);
        for (r, entry) in by_rank.iter().enumerate() {
            let Some((_, tok)) = entry else {
                return Err(TokenizerError::Vocab {
                    path: origin.to_string(),
                    msg: format!(
                        "rank {r} is missing (ranks must run 0..{} without gaps, since the special tokens are numbered after them)",
                        by_rank.len()
                    ),
                });
            };
            bytes.extend_from_slice(tok);
            let end = u32::try_from(bytes.len()).map_err(|_| TokenizerError::Vocab {
                path: origin.to_string(),
                msg: "the vocabulary exceeds 4 GiB".to_string(),
            })?;
            offsets.push(end);
        }
        for b in 0..=255u8 {
            if !encoder.contains_key(&[b][..]) {
                return Err(TokenizerError::Vocab {
                    path: origin.to_string(),
                    msg: format!(
                        "the single byte 0x{b:02x} is not a token, so some text could not be encoded (a byte-level vocabulary holds all 256 bytes)"
                    ),
                });
            }
        }
        Ok(Self::with_ranks(encoder, bytes, offsets))
    }

    fn with_ranks(encoder: FxMap<Box<[u8]>, u32>, bytes: Vec<u8>, offsets: Vec<u32>) -> Self {
        let n_ranks = (offsets.len() - 1) as u32;
        let mut special_names: Vec<String> =
            vec!["<|endoftext|>".to_string(), "<|im_start|>".to_string(), "<|im_end|>".to_string()];
        special_names.extend((0..N_EXTRA).map(|i| format!("<|extra_{i}|>")));
        special_names.extend(IMAGE_TAGS.iter().map(|s| s.to_string()));
        let mut special_lookup: FxMap<Box<str>, u32> = FxMap::default();
        let mut special_lens: Vec<usize> = Vec::new();
        for (i, name) in special_names.iter().enumerate() {
            special_lookup.insert(name.as_str().into(), n_ranks + i as u32);
            if !special_lens.contains(&name.len()) {
                special_lens.push(name.len());
            }
        }
        special_lens.sort_unstable_by(|a, b| b.cmp(a));
        let tag = |name: &str| special_lookup[name];
        let specials = SpecialIds {
            endoftext: n_ranks,
            im_start: n_ranks + 1,
            im_end: n_ranks + 2,
            ref_start: tag("<ref>"),
            ref_end: tag("</ref>"),
            box_start: tag("<box>"),
            box_end: tag("</box>"),
            quad_start: tag("<quad>"),
            quad_end: tag("</quad>"),
            img_start: tag("<img>"),
            img_end: tag("</img>"),
            img_pad: tag("<imgpad>"),
        };
        let regex = SysRegex::new(QWEN_PATTERN).expect("the Qwen regex compiles");
        Self { encoder, bytes, offsets, special_names, special_lookup, special_lens, specials, regex }
    }

    /// Ids of the named special tokens.
    pub fn specials(&self) -> &SpecialIds {
        &self.specials
    }

    /// Number of BPE ranks (151643 for Qwen); the first special token's id.
    pub fn n_ranks(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Number of ids the tokenizer knows: ranks plus the 217 special tokens.
    pub fn n_vocab(&self) -> usize {
        self.n_ranks() + self.special_names.len()
    }

    /// Whether `id` is one of the special tokens.
    pub fn is_special(&self, id: u32) -> bool {
        let id = id as usize;
        id >= self.n_ranks() && id < self.n_vocab()
    }

    /// The surface form of a special token (`<|im_end|>`, `<img>`, …).
    pub fn special_name(&self, id: u32) -> Option<&str> {
        if self.is_special(id) {
            Some(&self.special_names[id as usize - self.n_ranks()])
        } else {
            None
        }
    }

    /// The bytes of an ordinary token, `None` for special or unknown ids.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let r = id as usize;
        if r < self.n_ranks() {
            Some(&self.bytes[self.offsets[r] as usize..self.offsets[r + 1] as usize])
        } else {
            None
        }
    }

    /// Encodes text like the reference `tokenizer.encode(text)` (with
    /// [`Specials::All`]) or `tokenizer.encode(text, allowed_special=IMAGE_ST)`
    /// (with [`Specials::ImageTags`]): NFC, special tokens, BPE, image spans.
    pub fn encode(&self, text: &str, specials: Specials) -> Result<Vec<u32>, TokenizerError> {
        let text = nfc(text);
        let segments = self.segments(&text, specials);
        let mut out = Vec::with_capacity(text.len() / 3 + 4);
        let mut i = 0;
        while i < segments.len() {
            match segments[i] {
                Segment::Text(text) => self.encode_ordinary(text, &mut out)?,
                Segment::Special { id, offset } if id == self.specials.img_start => {
                    // Collect the path up to the matching </img>.
                    let mut path = "";
                    let mut j = i + 1;
                    loop {
                        match segments.get(j) {
                            None => return Err(TokenizerError::UnclosedImage { offset }),
                            Some(Segment::Special { id, .. }) if *id == self.specials.img_end => break,
                            Some(Segment::Special { id, .. }) => {
                                return Err(TokenizerError::ImagePathSpecial {
                                    token: self.special_names[*id as usize - self.n_ranks()].clone(),
                                })
                            }
                            // Text segments are maximal, so there is at most one.
                            Some(Segment::Text(text)) => path = text,
                        }
                        j += 1;
                    }
                    if path.len() > IMG_TOKEN_SPAN {
                        return Err(TokenizerError::ImagePathTooLong { len: path.len() });
                    }
                    out.push(self.specials.img_start);
                    out.extend(path.bytes().map(u32::from));
                    out.resize(out.len() + IMG_TOKEN_SPAN - path.len(), self.specials.img_pad);
                    out.push(self.specials.img_end);
                    i = j;
                }
                Segment::Special { id, .. } => out.push(id),
            }
            i += 1;
        }
        Ok(out)
    }

    /// Cuts NFC text at the allowed special surface forms (leftmost first).
    fn segments<'a>(&self, text: &'a str, specials: Specials) -> Vec<Segment<'a>> {
        let first_tag = self.specials.ref_start;
        let bytes = text.as_bytes();
        let mut segments = Vec::new();
        let mut start = 0;
        let mut pos = 0;
        while let Some(rel) = bytes[pos..].iter().position(|&b| b == b'<') {
            let at = pos + rel;
            let mut found = None;
            for &len in &self.special_lens {
                let Some(cand) = text.get(at..at + len) else {
                    continue;
                };
                if let Some(&id) = self.special_lookup.get(cand) {
                    if specials == Specials::All || id >= first_tag {
                        found = Some((id, len));
                        break;
                    }
                }
            }
            match found {
                Some((id, len)) => {
                    if at > start {
                        segments.push(Segment::Text(&text[start..at]));
                    }
                    segments.push(Segment::Special { id, offset: at });
                    start = at + len;
                    pos = start;
                }
                None => pos = at + 1,
            }
        }
        if start < text.len() {
            segments.push(Segment::Text(&text[start..]));
        }
        segments
    }

    /// Regex-splits text that holds no special tokens and BPE-encodes each piece.
    ///
    /// fancy-regex gives up on a very long whitespace run (its backtracking
    /// limit, hit near a million spaces; tiktoken fails there too). The
    /// regex's match for such a run is computed directly and the regex
    /// resumes after it: the pattern has no anchors or look-behind, so
    /// restarting at a match boundary changes nothing.
    fn encode_ordinary(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mut pos = 0;
        while pos < text.len() {
            let rest = &text[pos..];
            let mut covered = 0;
            for (s, e) in self.regex.find_iter(rest) {
                if s != covered {
                    break;
                }
                self.bpe(&rest.as_bytes()[s..e], out);
                covered = e;
            }
            pos += covered;
            if pos == text.len() {
                break;
            }
            let end =
                whitespace_run_match(text, pos).ok_or(TokenizerError::Pretokenize { offset: pos, len: text.len() })?;
            self.bpe(&text.as_bytes()[pos..end], out);
            pos = end;
        }
        Ok(())
    }

    #[inline]
    fn rank(&self, bytes: &[u8]) -> Option<u32> {
        self.encoder.get(bytes).copied()
    }

    /// tiktoken's byte-pair merge of one regex piece.
    fn bpe(&self, piece: &[u8], out: &mut Vec<u32>) {
        if let Some(r) = self.rank(piece) {
            out.push(r);
        } else if piece.len() < HEAP_THRESHOLD {
            self.bpe_simple(piece, out);
        } else {
            self.bpe_heap(piece, out);
        }
    }

    /// The quadratic tiktoken loop: fine for ordinary (short) pieces.
    fn bpe_simple(&self, piece: &[u8], out: &mut Vec<u32>) {
        if piece.is_empty() {
            return;
        }
        // parts[i] = (start of part i, rank of part i merged with part i+1).
        let mut parts: Vec<(usize, u32)> = Vec::with_capacity(piece.len() + 1);
        for i in 0..piece.len() - 1 {
            parts.push((i, self.rank(&piece[i..i + 2]).unwrap_or(u32::MAX)));
        }
        parts.push((piece.len() - 1, u32::MAX));
        parts.push((piece.len(), u32::MAX));
        let pair_rank = |parts: &[(usize, u32)], i: usize| {
            if i + 3 < parts.len() {
                self.rank(&piece[parts[i].0..parts[i + 3].0]).unwrap_or(u32::MAX)
            } else {
                u32::MAX
            }
        };
        loop {
            let mut min = (u32::MAX, usize::MAX);
            for (i, &(_, r)) in parts[..parts.len() - 1].iter().enumerate() {
                if r < min.0 {
                    min = (r, i);
                }
            }
            if min.0 == u32::MAX {
                break;
            }
            let i = min.1;
            if i > 0 {
                parts[i - 1].1 = pair_rank(&parts, i - 1);
            }
            parts[i].1 = pair_rank(&parts, i);
            parts.remove(i + 1);
        }
        for w in parts.windows(2) {
            out.push(self.rank(&piece[w[0].0..w[1].0]).expect("BPE parts are tokens"));
        }
    }

    /// The same merge order with a heap and a linked list: `O(n log n)`.
    /// Heap entries `(rank, left, right, right_end)` are checked for
    /// staleness when popped; ties go to the leftmost pair as in tiktoken.
    fn bpe_heap(&self, piece: &[u8], out: &mut Vec<u32>) {
        let n = piece.len();
        if n == 0 {
            return;
        }
        const NONE: usize = usize::MAX;
        // Parts are identified by their start byte; next[s] = end of that part.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        prev[0] = NONE;
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some(r) = self.rank(&piece[i..i + 2]) {
                heap.push(Reverse((r, i, i + 1, i + 2)));
            }
        }
        while let Some(Reverse((_, left, right, right_end))) = heap.pop() {
            if !alive[left] || next[left] != right || !alive[right] || next[right] != right_end {
                continue;
            }
            alive[right] = false;
            next[left] = right_end;
            if right_end < n {
                prev[right_end] = left;
            }
            let p = prev[left];
            if p != NONE {
                if let Some(r) = self.rank(&piece[p..right_end]) {
                    heap.push(Reverse((r, p, left, right_end)));
                }
            }
            if right_end < n {
                let q_end = next[right_end];
                if let Some(r) = self.rank(&piece[left..q_end]) {
                    heap.push(Reverse((r, left, right_end, q_end)));
                }
            }
        }
        let mut s = 0;
        while s < n {
            let e = next[s];
            out.push(self.rank(&piece[s..e]).expect("BPE parts are tokens"));
            s = e;
        }
    }

    /// Decodes ids like the reference `tokenizer.decode`: token bytes are
    /// concatenated and invalid UTF-8 becomes U+FFFD; an image span
    /// (`<img>`, path bytes, `<imgpad>`…, `</img>`) becomes `<img>PATH</img>`.
    /// With `skip_special` every special id is dropped (an image span leaves
    /// just PATH). Ids beyond the vocabulary (the model's unused rows) decode
    /// to U+FFFD, or are dropped with `skip_special`. Where the reference
    /// raises (a span without `</img>`, a span whose path holds non-byte ids)
    /// the ids are decoded one by one instead.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut buf: Vec<u8> = Vec::with_capacity(ids.len() * 4);
        let sp = &self.specials;
        let mut i = 0;
        while i < ids.len() {
            let id = ids[i];
            if id == sp.img_start {
                if let Some(rel) = ids[i + 1..].iter().position(|&x| x == sp.img_end) {
                    let inner = &ids[i + 1..i + 1 + rel];
                    let path_len = inner.iter().position(|&x| x == sp.img_pad).unwrap_or(inner.len());
                    let path = &inner[..path_len];
                    if path.iter().all(|&x| x < 256) {
                        if !skip_special {
                            buf.extend_from_slice(b"<img>");
                        }
                        buf.extend(path.iter().map(|&x| x as u8));
                        if !skip_special {
                            buf.extend_from_slice(b"</img>");
                        }
                        i += rel + 2;
                        continue;
                    }
                }
            }
            if let Some(b) = self.token_bytes(id) {
                buf.extend_from_slice(b);
            } else if !skip_special {
                match self.special_name(id) {
                    Some(name) => buf.extend_from_slice(name.as_bytes()),
                    None => buf.extend_from_slice("\u{FFFD}".as_bytes()),
                }
            }
            i += 1;
        }
        match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// Finds every image span of a prompt and reads its path back, as the
    /// reference model does before loading the images: `<img>` at `a`,
    /// `</img>` at `b = a + 257`, path = ids `a+1 .. b` cut at the first
    /// `<imgpad>`, bytes → UTF-8. A stray or unclosed tag, a span that is not
    /// 256 slots long, a non-byte id in the path, an empty path or invalid
    /// UTF-8 is an error. (A path of exactly 256 bytes, which leaves no pad,
    /// is accepted; the reference model would fail on it.)
    pub fn image_spans(&self, ids: &[u32]) -> Result<Vec<ImageSpan>, TokenizerError> {
        let sp = &self.specials;
        let mut spans = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            if ids[i] == sp.img_end {
                return Err(TokenizerError::UnopenedImageSpan { pos: i });
            }
            if ids[i] != sp.img_start {
                i += 1;
                continue;
            }
            let start = i;
            let end = match ids[start + 1..].iter().position(|&x| x == sp.img_start || x == sp.img_end) {
                Some(rel) if ids[start + 1 + rel] == sp.img_end => start + 1 + rel,
                _ => return Err(TokenizerError::UnclosedImageSpan { pos: start }),
            };
            let slots = &ids[start + 1..end];
            if slots.len() != IMG_TOKEN_SPAN {
                return Err(TokenizerError::ImageSpanLength { start, end, len: slots.len() });
            }
            let path_len = slots.iter().position(|&x| x == sp.img_pad).unwrap_or(slots.len());
            if path_len == 0 {
                return Err(TokenizerError::EmptyImagePath { start });
            }
            let mut path = Vec::with_capacity(path_len);
            for (k, &id) in slots[..path_len].iter().enumerate() {
                let byte =
                    u8::try_from(id).map_err(|_| TokenizerError::ImagePathToken { start, pos: start + 1 + k, id })?;
                path.push(byte);
            }
            let path = String::from_utf8(path).map_err(|e| TokenizerError::ImagePathUtf8 {
                start,
                path_lossy: String::from_utf8_lossy(e.as_bytes()).into_owned(),
            })?;
            spans.push(ImageSpan { start, end, path });
            i = end + 1;
        }
        Ok(spans)
    }
}

/// The end of the Qwen regex's match at `pos` when a run of at least two
/// whitespace characters starts there (`None` otherwise). With two or more
/// spaces the alternatives that take one leading space cannot match, so it is
/// `\s*[\r\n]+` (up to the run's last CR/LF) if the run holds one, else
/// `\s+(?!\S)` (the run minus its last character, or all of it at the end).
fn whitespace_run_match(text: &str, pos: usize) -> Option<usize> {
    let mut n_chars = 0;
    let mut run_end = pos;
    let mut last_char_start = pos;
    let mut last_newline_end = None;
    for (i, c) in text[pos..].char_indices() {
        if !c.is_whitespace() {
            break;
        }
        n_chars += 1;
        last_char_start = pos + i;
        run_end = pos + i + c.len_utf8();
        if c == '\r' || c == '\n' {
            last_newline_end = Some(run_end);
        }
    }
    if n_chars < 2 {
        return None;
    }
    Some(match last_newline_end {
        Some(end) => end,
        None if run_end == text.len() => run_end,
        None => last_char_start,
    })
}

/// NFC-normalises text (ASCII is already NFC and is passed through).
fn nfc(text: &str) -> Cow<'_, str> {
    if text.is_ascii() {
        Cow::Borrowed(text)
    } else {
        let mut n = NormalizedString::from(text);
        n.nfc();
        Cow::Owned(n.get().to_owned())
    }
}

const B64_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Strict standard base64 (with `=` padding) into `out`.
fn base64_decode(s: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let b = s.as_bytes();
    let chunks = b.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        return Err(format!("length {} is not a multiple of 4", b.len()));
    }
    let val = |c: u8, at: usize| -> Result<u32, String> {
        match c {
            b'A'..=b'Z' => Ok((c - b'A') as u32),
            b'a'..=b'z' => Ok((c - b'a') as u32 + 26),
            b'0'..=b'9' => Ok((c - b'0') as u32 + 52),
            b'+' => Ok(62),
            b'/' => Ok(63),
            _ => Err(format!("invalid character {:?} at {at}", c as char)),
        }
    };
    let n_chunks = chunks.len();
    for (k, chunk) in chunks.enumerate() {
        let last = k + 1 == n_chunks;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err("misplaced `=` padding".to_string());
        }
        let mut acc = 0u32;
        for (j, &c) in chunk[..4 - pad].iter().enumerate() {
            acc |= val(c, k * 4 + j)? << (18 - 6 * j);
        }
        out.push((acc >> 16) as u8);
        if pad < 2 {
            out.push((acc >> 8) as u8);
        }
        if pad < 1 {
            out.push(acc as u8);
        }
    }
    Ok(())
}

/// Standard base64 with padding.
fn base64_encode(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let acc = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for j in 0..4 {
            if j <= chunk.len() {
                s.push(B64_ALPHABET[(acc >> (18 - 6 * j) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Common English words for the demo vocabulary (each also with a leading
/// space), separated by whitespace.
const DEMO_WORDS: &str = "\
    the of and to in is it that for on with as was are this be at by from or an have not \
    but what all were when we there can which their if do will each about how up out them \
    then she many some so these would other into has more two like him see time could no \
    make than first been its who now people my made over did down only way find use may \
    water long little very after words called just where most know picture image color red \
    green blue white black dog cat box left right top bottom you are helpful assistant user \
    system what describe in hello world question answer circle square line text there here \
    one three four";

/// Common English letter pairs, merged before the words.
const DEMO_PAIRS: &[&str] = &[
    "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed", "is", "it", "al",
    "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le", "ve", "co", "me", "de", "hi", "ri", "ro", "ic",
    "ne", "ea", "ra", "ce", "li", "ch", "ll", "be", "ma", "si", "om", "ur", "ca", "el", "ta", "la", "ns", "di", "fo",
    "ho", "pe", "ec", "pr", "no", "ct", "us", "ac", "ot", "il", "tr", "ly", "nc", "et", "ut", "ss", "so", "rs", "un",
    "lo", "wa", "ge", "ie", "wh", "ee", "wi", "em", "ad", "ol", "rt", "po", "we", "na", "ul", "ni", "ts", "mo", "ow",
    "pa", "im", "mi", "ai", "sh", ". ", ", ", "\n\n", "  ",
];

/// A small byte-level vocabulary in tiktoken format for a random-weight demo
/// model: the 256 single bytes with rank = byte value, then common English
/// letter pairs, then every prefix of common words (with and without a
/// leading space), so that each multi-byte token is a shorter token plus one
/// byte. Any text encodes (non-English text falls back to single bytes).
pub fn demo_tiktoken() -> String {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut seen: std::collections::HashSet<Vec<u8>> = tokens.iter().cloned().collect();
    let mut add = |tokens: &mut Vec<Vec<u8>>, t: &[u8]| {
        if seen.insert(t.to_vec()) {
            tokens.push(t.to_vec());
        }
    };
    for p in DEMO_PAIRS {
        add(&mut tokens, p.as_bytes());
    }
    for w in DEMO_WORDS.split_ascii_whitespace() {
        for word in [w.to_string(), format!(" {w}")] {
            let b = word.as_bytes();
            for len in 2..=b.len() {
                add(&mut tokens, &b[..len]);
            }
        }
    }
    let mut s = String::with_capacity(tokens.len() * 12);
    for (rank, t) in tokens.iter().enumerate() {
        s.push_str(&base64_encode(t));
        s.push(' ');
        s.push_str(&rank.to_string());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> QwenTokenizer {
        QwenTokenizer::from_tiktoken_str(&demo_tiktoken(), "demo").unwrap()
    }

    #[test]
    fn base64_round_trip() {
        for data in [&b""[..], b"a", b"ab", b"abc", b"abcd", b"\xff\x00\x80", b" the"] {
            let e = base64_encode(data);
            let mut d = Vec::new();
            base64_decode(&e, &mut d).unwrap();
            assert_eq!(d, data, "{e}");
        }
        assert_eq!(base64_encode(b"!"), "IQ==");
        let mut d = Vec::new();
        assert!(base64_decode("I*==", &mut d).is_err());
        assert!(base64_decode("IQ=", &mut d).is_err());
        assert!(base64_decode("IQ==IQ==", &mut d).is_err());
    }

    #[test]
    fn demo_vocab_is_byte_level_and_closed_under_halves() {
        let text = demo_tiktoken();
        let tok = QwenTokenizer::from_tiktoken_str(&text, "demo").unwrap();
        assert!(tok.n_ranks() > 256 + 200, "a few hundred merges");
        for b in 0..=255u32 {
            assert_eq!(tok.token_bytes(b).unwrap(), &[b as u8]);
        }
        for r in 256..tok.n_ranks() as u32 {
            let t = tok.token_bytes(r).unwrap();
            assert!(t.len() >= 2);
            assert!(tok.rank(&t[..t.len() - 1]).is_some_and(|x| x < r));
        }
        assert_eq!(tok.specials().endoftext as usize, tok.n_ranks());
        assert_eq!(tok.n_vocab(), tok.n_ranks() + 217);
        assert_eq!(tok.specials().img_pad as usize, tok.n_vocab() - 1);
    }

    #[test]
    fn demo_round_trips() {
        let tok = demo();
        for text in [
            "Hello world! What is in this picture? The dog is on the left.",
            "  leading spaces\n\nand newlines\r\n\ttabs  ",
            "你好，世界！通义千问。",
            "Mixed 中English混合text 123 😀",
            "",
        ] {
            let ids = tok.encode(text, Specials::All).unwrap();
            assert_eq!(tok.decode(&ids, false), text);
            assert_eq!(tok.decode(&ids, true), text);
        }
        // Common words become single tokens; Chinese falls back to bytes.
        let ids = tok.encode(" the", Specials::All).unwrap();
        assert_eq!(ids.len(), 1);
        let ids = tok.encode("你", Specials::All).unwrap();
        assert_eq!(ids, "你".bytes().map(u32::from).collect::<Vec<_>>());
    }

    #[test]
    fn specials_and_image_spans_with_demo_vocab() {
        let tok = demo();
        let sp = *tok.specials();
        let ids = tok.encode("<|im_start|>user\nPicture 1:<img>图/a.png</img>\nhi<|im_end|>", Specials::All).unwrap();
        assert_eq!(ids[0], sp.im_start);
        assert_eq!(*ids.last().unwrap(), sp.im_end);
        let spans = tok.image_spans(&ids).unwrap();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].path, "图/a.png");
        assert_eq!(spans[0].end - spans[0].start, 257);
        assert_eq!(ids[spans[0].start], sp.img_start);
        assert_eq!(ids[spans[0].start + 1], "图".as_bytes()[0] as u32);
        assert_eq!(tok.decode(&ids, false), "<|im_start|>user\nPicture 1:<img>图/a.png</img>\nhi<|im_end|>");
        assert_eq!(tok.decode(&ids, true), "user\nPicture 1:图/a.png\nhi");
        // In chat content <|im_start|> is plain text, image tags stay special.
        let chat = tok.encode("<|im_start|><ref>x</ref>", Specials::ImageTags).unwrap();
        assert!(!chat.contains(&sp.im_start));
        assert!(chat.contains(&sp.ref_start) && chat.contains(&sp.ref_end));
        assert_eq!(tok.decode(&chat, false), "<|im_start|><ref>x</ref>");
        // A 256-byte path fits; 257 does not.
        let p256 = "p".repeat(256);
        let ids = tok.encode(&format!("<img>{p256}</img>"), Specials::All).unwrap();
        assert_eq!(ids.len(), 258);
        assert_eq!(tok.image_spans(&ids).unwrap()[0].path, p256);
    }

    #[test]
    fn encode_errors_say_what_is_wrong() {
        let tok = demo();
        let e = tok.encode("look: <img>a.png", Specials::All).unwrap_err();
        assert!(matches!(e, TokenizerError::UnclosedImage { offset: 6 }), "{e:?}");
        assert!(e.to_string().contains("</img>"), "{e}");
        let long = format!("<img>{}</img>", "é".repeat(129));
        let e = tok.encode(&long, Specials::ImageTags).unwrap_err();
        assert!(matches!(e, TokenizerError::ImagePathTooLong { len: 258 }), "{e:?}");
        assert!(e.to_string().contains("258 bytes"), "{e}");
        let e = tok.encode("<img>a<ref>b</img>", Specials::All).unwrap_err();
        assert!(e.to_string().contains("<ref>"), "{e}");
        // <|endoftext|> inside a path is plain text when not allowed.
        let ids = tok.encode("<img>a<|endoftext|></img>", Specials::ImageTags).unwrap();
        assert_eq!(tok.image_spans(&ids).unwrap()[0].path, "a<|endoftext|>");
        assert!(tok.encode("<img>a<|endoftext|></img>", Specials::All).is_err());
    }

    #[test]
    fn image_span_errors() {
        let tok = demo();
        let sp = *tok.specials();
        let good = tok.encode("x<img>a.png</img>y", Specials::All).unwrap();
        assert_eq!(tok.image_spans(&good).unwrap()[0].start, 1);
        let unclosed = &good[..good.len() - 2];
        let e = tok.image_spans(unclosed).unwrap_err();
        assert!(matches!(e, TokenizerError::UnclosedImageSpan { pos: 1 }), "{e:?}");
        let e = tok.image_spans(&[5, sp.img_end]).unwrap_err();
        assert!(matches!(e, TokenizerError::UnopenedImageSpan { pos: 1 }), "{e:?}");
        let e = tok.image_spans(&[sp.img_start, 97, sp.img_pad, sp.img_end]).unwrap_err();
        assert!(matches!(e, TokenizerError::ImageSpanLength { len: 2, .. }), "{e:?}");
        let mut bad = good.clone();
        bad[3] = 300;
        let e = tok.image_spans(&bad).unwrap_err();
        assert!(matches!(e, TokenizerError::ImagePathToken { pos: 3, id: 300, .. }), "{e:?}");
        let mut bad = good.clone();
        bad[2] = 0xff;
        let e = tok.image_spans(&bad).unwrap_err();
        assert!(matches!(e, TokenizerError::ImagePathUtf8 { .. }), "{e:?}");
        let empty = tok.encode("<img></img>", Specials::All).unwrap();
        assert_eq!(empty.len(), 258);
        let e = tok.image_spans(&empty).unwrap_err();
        assert!(matches!(e, TokenizerError::EmptyImagePath { start: 0 }), "{e:?}");
    }

    #[test]
    fn decode_replaces_invalid_utf8_and_unknown_ids() {
        let tok = demo();
        let bytes = "é通".as_bytes();
        let ids: Vec<u32> = bytes.iter().map(|&b| b as u32).collect();
        assert_eq!(tok.decode(&ids, false), "é通");
        assert_eq!(tok.decode(&ids[..1], false), "\u{FFFD}");
        assert_eq!(tok.decode(&ids[2..4], false), "\u{FFFD}");
        let unknown = tok.n_vocab() as u32 + 3;
        assert_eq!(tok.decode(&[104, unknown, 105], false), "h\u{FFFD}i");
        assert_eq!(tok.decode(&[104, unknown, 105], true), "hi");
        // An unclosed span decodes token by token.
        let sp = *tok.specials();
        assert_eq!(tok.decode(&[sp.img_start, 97], false), "<img>a");
    }

    #[test]
    fn corrupt_vocabularies_name_the_line() {
        let good = demo_tiktoken();
        let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
        lines[9] = "I*== 9".to_string();
        let e = QwenTokenizer::from_tiktoken_str(&lines.join("\n"), "v.tiktoken").unwrap_err();
        assert!(matches!(e, TokenizerError::Parse { line: 10, .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.starts_with("v.tiktoken:10:") && msg.contains("base64"), "{msg}");

        let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
        lines[300] = lines[300].split(' ').next().unwrap().to_string();
        let e = QwenTokenizer::from_tiktoken_str(&lines.join("\n"), "v.tiktoken").unwrap_err();
        assert!(matches!(e, TokenizerError::Parse { line: 301, .. }), "{e:?}");
        assert!(e.to_string().contains("missing rank"), "{e}");

        let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
        lines[5] = "Bg== x5".to_string();
        let e = QwenTokenizer::from_tiktoken_str(&lines.join("\n"), "v").unwrap_err();
        assert!(e.to_string().contains("v:6:") && e.to_string().contains("x5"), "{e}");

        let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
        lines.remove(7);
        let e = QwenTokenizer::from_tiktoken_str(&lines.join("\n"), "v").unwrap_err();
        assert!(e.to_string().contains("rank 7 is missing"), "{e}");

        let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
        lines[8] = "Bw== 8".to_string(); // byte 7 again
        let e = QwenTokenizer::from_tiktoken_str(&lines.join("\n"), "v").unwrap_err();
        assert!(e.to_string().contains("v:9:") && e.to_string().contains("line 8"), "{e}");

        let e = QwenTokenizer::from_tiktoken_str("", "v").unwrap_err();
        assert!(e.to_string().contains("no tokens"), "{e}");
        let e = QwenTokenizer::from_file(Path::new("/nonexistent/qwen.tiktoken")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/qwen.tiktoken"), "{e}");
    }

    /// Deterministic pseudo-random strings over a small alphabet, so that many
    /// merges apply, to check that the heap merge equals the tiktoken loop.
    #[test]
    fn heap_merge_equals_simple_merge() {
        let tok = demo();
        let alphabet: Vec<&[u8]> = vec![b"t", b"h", b"e", b" ", b"a", b"n", b"d", b"i", b"s", b"o"];
        let mut state = 0x1234_5678_9abc_def0u64;
        for len in [1usize, 2, 3, 5, 8, 13, 40, 200, 1000] {
            for _ in 0..20 {
                let mut piece = Vec::new();
                while piece.len() < len {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    piece.extend_from_slice(alphabet[(state % alphabet.len() as u64) as usize]);
                }
                let (mut a, mut b) = (Vec::new(), Vec::new());
                tok.bpe_simple(&piece, &mut a);
                tok.bpe_heap(&piece, &mut b);
                assert_eq!(a, b, "{:?}", String::from_utf8_lossy(&piece));
            }
        }
        // A long run of one letter (the quadratic case) is fast and correct.
        let piece = vec![b'e'; 20001];
        let mut b = Vec::new();
        tok.bpe_heap(&piece, &mut b);
        assert_eq!(b.len(), 10001, "pairs of `ee` then one `e`");
        let text = "e".repeat(20001);
        assert_eq!(tok.decode(&tok.encode(&text, Specials::All).unwrap(), false), text);
    }

    #[test]
    fn whitespace_fallback_equals_the_regex() {
        let tok = demo();
        let runs = [
            "  ",
            "   a",
            "  \n  a",
            " \n\n ",
            "\t\t",
            "  \u{3000}x",
            "\u{3000}\u{3000}",
            "\r\n\r\n  b",
            "  \n",
            " \t \t.",
            "\n\n\n",
            "  1",
            " \u{a0}\u{2003} é",
        ];
        for run in runs {
            let first = tok.regex.find_iter(run).next().unwrap();
            assert_eq!(first.0, 0);
            assert_eq!(whitespace_run_match(run, 0), Some(first.1), "{run:?}");
        }
        assert_eq!(whitespace_run_match(" a", 0), None);
        assert_eq!(whitespace_run_match("a  ", 0), None);
        // Runs long enough to stop fancy-regex still encode and round-trip.
        for text in
            [format!("x{}a", " ".repeat(1_100_000)), format!("{}\n {}b", " ".repeat(1_100_000), "\t".repeat(10))]
        {
            let ids = tok.encode(&text, Specials::All).unwrap();
            assert_eq!(tok.decode(&ids, false), text);
        }
    }

    /// With the real vocabulary (when the fixtures are present), the heap
    /// merge equals the tiktoken loop on every regex piece of varied text.
    #[test]
    fn heap_merge_equals_simple_merge_on_qwen_vocab() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/tiny-qwen-vl/qwen.tiktoken");
        if !path.is_file() {
            println!("skipped: ../shared/fixtures not found");
            return;
        }
        let tok = QwenTokenizer::from_file(&path).unwrap();
        let mut text = String::from(
            "The quick brown fox jumps over the lazy dog. 通义千问是阿里云研发的大规模语言模型。\
             日本語のテキスト 한국어 텍스트 Ωμέγα русский текст العربية हिन्दी ไทย 😀👨‍👩‍👧 \
             def f(x):\n    return x ** 2\n\n\n\t\t   <html>&amp; https://example.com/?q=1",
        );
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let c = match state % 4 {
                0 => char::from(b'a' + (state >> 8) as u8 % 26),
                1 => ' ',
                2 => char::from_u32(0x4e00 + (state >> 8) as u32 % 500).unwrap(),
                _ => char::from_u32(0x3b1 + (state >> 8) as u32 % 20).unwrap(),
            };
            text.push(c);
        }
        let long_word: String = "internationalization".repeat(20);
        text.push_str(&long_word);
        let mut n_pieces = 0;
        for (s, e) in tok.regex.find_iter(&text) {
            let piece = &text.as_bytes()[s..e];
            let (mut a, mut b) = (Vec::new(), Vec::new());
            tok.bpe_simple(piece, &mut a);
            tok.bpe_heap(piece, &mut b);
            assert_eq!(a, b, "{:?}", &text[s..e]);
            n_pieces += 1;
        }
        assert!(n_pieces > 500);
    }
}
