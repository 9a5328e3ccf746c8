//! `image_url` → picture: `data:` URLs, `http(s)` URLs behind an SSRF guard,
//! and local files under one allowed directory; then the size checks, the
//! decode and the preprocessing, all with named errors (each an HTTP 400).
//!
//! The SSRF guard (unless `--allow-private-urls`): a URL whose host is an IP
//! literal is checked before anything is sent; a host name goes through
//! [`GuardedResolver`], which drops every resolved address that is not
//! globally routable (loopback, private, link-local, unspecified, multicast,
//! CGNAT, IPv4-mapped/compatible/NAT64/6to4 forms of those, ...) before the
//! client connects, so a name that resolves to `127.0.0.1` is never
//! contacted; every redirect target is checked the same way (at most
//! `max_redirects`). No proxy is used. The body is read in chunks and the
//! fetch stops as soon as it passes `max_image_bytes`.

use base64::Engine as _;
use qvc_model::image::{decode_rgb, preprocess_rgb};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Limits and permissions for fetching pictures.
#[derive(Clone, Debug)]
pub struct MediaConfig {
    /// Allow `http(s)` URLs that resolve to loopback, private, link-local, ... addresses.
    pub allow_private_urls: bool,
    /// Local paths and `file://` URLs are allowed only inside this directory (canonical; see
    /// [`MediaConfig::with_local_dir`]). `None`: refused.
    pub allowed_local_path: Option<PathBuf>,
    /// Most bytes of one encoded picture (data URL payload, download or file).
    pub max_image_bytes: usize,
    /// Most pixels (width × height, from the header, before decoding) of one picture.
    pub max_image_pixels: u64,
    /// Whole-request timeout of one download.
    pub fetch_timeout: Duration,
    /// Most redirects one download follows.
    pub max_redirects: usize,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            allow_private_urls: false,
            allowed_local_path: None,
            max_image_bytes: 20 << 20,
            max_image_pixels: 50_000_000,
            fetch_timeout: Duration::from_secs(30),
            max_redirects: 3,
        }
    }
}

impl MediaConfig {
    /// Sets the allowed local directory, canonicalised (it must exist and be a directory).
    pub fn with_local_dir(mut self, dir: &Path) -> Result<MediaConfig, MediaError> {
        let canon = std::fs::canonicalize(dir)
            .map_err(|e| MediaError::LocalDir { dir: dir.display().to_string(), why: e.to_string() })?;
        if !canon.is_dir() {
            return Err(MediaError::LocalDir { dir: dir.display().to_string(), why: "not a directory".into() });
        }
        self.allowed_local_path = Some(canon);
        Ok(self)
    }
}

/// Why a picture could not be had. Every variant is the client's problem (HTTP 400) with a
/// machine-readable [`MediaError::code`].
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("not a valid data URL: {0}")]
    BadDataUrl(String),
    #[error("unsupported image URL {url}: expected a data: URL (base64), http(s)://, file:// or a local path")]
    UnsupportedScheme { url: String },
    #[error("invalid image URL {url}: {why}")]
    BadUrl { url: String, why: String },
    #[error("the image is {bytes} bytes, more than this server's limit of {limit} bytes (--max-image-bytes)")]
    TooManyBytes { bytes: u64, limit: usize },
    #[error(
        "the image is {width}x{height} = {} pixels, more than this server's limit of {limit} pixels \
         (--max-image-pixels); downscale it", *width as u64 * *height as u64
    )]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error(
        "image URL {url} points to a {reason} address ({addr}); this server only fetches public addresses \
         (start it with --allow-private-urls to allow this)"
    )]
    Forbidden { url: String, addr: IpAddr, reason: &'static str },
    #[error("image URL {url}: {why}")]
    Fetch { url: String, why: String },
    #[error("image URL {url} answered HTTP {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("image URL {url}: no answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("image URL {url}: more than {max} redirects")]
    TooManyRedirects { url: String, max: usize },
    #[error(
        "local image {path:?}: local files are not served; start the server with --allowed-local-media-path DIR \
         to allow files under DIR"
    )]
    LocalNotAllowed { path: String },
    #[error("local image {path:?} is outside the allowed directory {dir}")]
    OutsideDir { path: String, dir: String },
    #[error("local image {path:?}: {why}")]
    Local { path: String, why: String },
    #[error("--allowed-local-media-path {dir}: {why}")]
    LocalDir { dir: String, why: String },
    #[error("the image cannot be decoded: {0}")]
    Decode(String),
}

impl MediaError {
    /// The OpenAI envelope's `code` for this error.
    pub fn code(&self) -> &'static str {
        match self {
            MediaError::BadDataUrl(_) | MediaError::UnsupportedScheme { .. } | MediaError::BadUrl { .. } => {
                "invalid_image_url"
            }
            MediaError::TooManyBytes { .. } => "image_too_large",
            MediaError::TooManyPixels { .. } => "image_too_many_pixels",
            MediaError::Forbidden { .. } => "image_url_forbidden",
            MediaError::Fetch { .. }
            | MediaError::HttpStatus { .. }
            | MediaError::Timeout { .. }
            | MediaError::TooManyRedirects { .. } => "image_fetch_failed",
            MediaError::LocalNotAllowed { .. } | MediaError::OutsideDir { .. } => "local_media_forbidden",
            MediaError::Local { .. } | MediaError::LocalDir { .. } => "local_media_unreadable",
            MediaError::Decode(_) => "image_decode_failed",
        }
    }
}

/// A URL as shown in messages: data URLs and long URLs are cut.
fn short(url: &str) -> String {
    const MAX: usize = 80;
    if url.len() <= MAX {
        return url.to_string();
    }
    let mut end = MAX;
    while !url.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &url[..end])
}

// ---------------------------------------------------------------------------
// Address classification

/// Why `ip` may not be fetched from without `--allow-private-urls`, or `None` when it is a
/// globally routable unicast address.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match () {
        _ if a == 0 => "unspecified (0.0.0.0/8)",
        _ if a == 127 => "loopback",
        _ if a == 10 || (a == 172 && (16..32).contains(&b)) || (a == 192 && b == 168) => "private",
        _ if a == 169 && b == 254 => "link-local",
        _ if a == 100 && (64..128).contains(&b) => "carrier-grade NAT (100.64.0.0/10)",
        _ if a == 192 && b == 0 && c == 0 => "IETF protocol (192.0.0.0/24)",
        _ if a == 198 && (b == 18 || b == 19) => "benchmarking (198.18.0.0/15)",
        _ if (224..240).contains(&a) => "multicast",
        _ if a >= 240 => "reserved or broadcast",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if ip.is_unspecified() {
        return Some("unspecified (::)");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // ::ffff:a.b.c.d (IPv4-mapped) and ::a.b.c.d (IPv4-compatible, deprecated): the IPv4 address decides.
    if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
        return forbidden_v4(embedded_v4(s[6], s[7])).or(if s[5] == 0 { Some("IPv4-compatible") } else { None });
    }
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach the embedded IPv4 address.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        return forbidden_v4(embedded_v4(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return forbidden_v4(embedded_v4(s[1], s[2]));
    }
    Some(match () {
        _ if s[0] & 0xfe00 == 0xfc00 => "private (unique local, fc00::/7)",
        _ if s[0] & 0xffc0 == 0xfe80 => "link-local",
        _ if s[0] & 0xffc0 == 0xfec0 => "site-local",
        _ if s[0] & 0xff00 == 0xff00 => "multicast",
        _ if s[0] == 0x2001 && s[1] == 0x0db8 => "documentation (2001:db8::/32)",
        _ if s[0] == 0x0100 && s[1..4] == [0; 3] => "discard (100::/64)",
        _ => return None,
    })
}

/// A URL's host when it is an IP literal.
fn ip_literal(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// The resolver the download client uses: getaddrinfo, then every forbidden address dropped.
/// A host whose addresses are all forbidden fails with [`ForbiddenAddress`].
#[derive(Clone, Copy, Debug, Default)]
pub struct GuardedResolver;

/// The error [`GuardedResolver`] returns (found again in the client's error chain).
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves only to forbidden addresses (first: {addr}, {reason})")]
pub struct ForbiddenAddress {
    pub host: String,
    pub addr: IpAddr,
    pub reason: &'static str,
}

impl GuardedResolver {
    /// Keeps the allowed addresses; an error when none is left.
    pub fn filter(host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, ForbiddenAddress> {
        let first_bad = addrs.iter().find_map(|a| forbidden_reason(a.ip()).map(|r| (a.ip(), r)));
        let ok: Vec<SocketAddr> = addrs.into_iter().filter(|a| forbidden_reason(a.ip()).is_none()).collect();
        match (ok.is_empty(), first_bad) {
            (true, Some((addr, reason))) => Err(ForbiddenAddress { host: host.to_string(), addr, reason }),
            _ => Ok(ok),
        }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ok = GuardedResolver::filter(&host, addrs)?;
            let addrs: reqwest::dns::Addrs = Box::new(ok.into_iter());
            Ok(addrs)
        })
    }
}

/// The error a redirect policy raises (found again in the client's error chain).
#[derive(Debug, thiserror::Error)]
enum RedirectRefused {
    #[error("too many redirects")]
    TooMany,
    #[error("redirect to {0}: only http and https are followed")]
    Scheme(String),
    #[error("redirect to a {reason} address {addr}")]
    Forbidden { addr: IpAddr, reason: &'static str },
}

// ---------------------------------------------------------------------------
// Fetching

/// Turns `image_url`s into bytes. One per server (it holds the download client's connection pool).
#[derive(Clone)]
pub struct Fetcher {
    cfg: Arc<MediaConfig>,
    client: reqwest::Client,
}

impl Fetcher {
    pub fn new(cfg: MediaConfig) -> Result<Fetcher, MediaError> {
        let allow_private = cfg.allow_private_urls;
        let max_redirects = cfg.max_redirects;
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(RedirectRefused::TooMany);
            }
            let url = attempt.url();
            if !matches!(url.scheme(), "http" | "https") {
                let s = url.scheme().to_string();
                return attempt.error(RedirectRefused::Scheme(s));
            }
            if !allow_private {
                if let Some(addr) = ip_literal(url) {
                    if let Some(reason) = forbidden_reason(addr) {
                        return attempt.error(RedirectRefused::Forbidden { addr, reason });
                    }
                }
            }
            attempt.follow()
        });
        let mut builder = reqwest::Client::builder()
            .redirect(policy)
            .timeout(cfg.fetch_timeout)
            .connect_timeout(cfg.fetch_timeout.min(Duration::from_secs(10)))
            .no_proxy()
            .user_agent(concat!("qvc/", env!("CARGO_PKG_VERSION")));
        if !allow_private {
            builder = builder.dns_resolver(Arc::new(GuardedResolver));
        }
        let client = builder.build().map_err(|e| MediaError::Fetch { url: String::new(), why: e.to_string() })?;
        Ok(Fetcher { cfg: Arc::new(cfg), client })
    }

    pub fn config(&self) -> &MediaConfig {
        &self.cfg
    }

    /// The encoded bytes `url` names. `data:` URLs and local files are read on a blocking thread.
    pub async fn bytes(&self, url: &str) -> Result<Vec<u8>, MediaError> {
        match Source::of(url)? {
            Source::Data => {
                let (url, max) = (url.to_string(), self.cfg.max_image_bytes);
                blocking(move || parse_data_url(&url, max)).await
            }
            Source::Http => self.download(url).await,
            Source::Local(path) => {
                let cfg = self.cfg.clone();
                blocking(move || read_local(&path, &cfg)).await
            }
        }
    }

    async fn download(&self, raw: &str) -> Result<Vec<u8>, MediaError> {
        let url = reqwest::Url::parse(raw).map_err(|e| MediaError::BadUrl { url: short(raw), why: e.to_string() })?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(MediaError::BadUrl { url: short(raw), why: "no host".into() });
        }
        if !self.cfg.allow_private_urls {
            if let Some(addr) = ip_literal(&url) {
                if let Some(reason) = forbidden_reason(addr) {
                    return Err(MediaError::Forbidden { url: short(raw), addr, reason });
                }
            }
        }
        let shown = short(raw);
        let limit = self.cfg.max_image_bytes;
        let mut resp = self.client.get(url).send().await.map_err(|e| self.fetch_error(&shown, e))?;
        if !resp.status().is_success() {
            return Err(MediaError::HttpStatus { url: shown, status: resp.status().as_u16() });
        }
        if let Some(len) = resp.content_length() {
            if len > limit as u64 {
                return Err(MediaError::TooManyBytes { bytes: len, limit });
            }
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.fetch_error(&shown, e))? {
            if body.len() + chunk.len() > limit {
                return Err(MediaError::TooManyBytes { bytes: (body.len() + chunk.len()) as u64, limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Names what went wrong in a download, finding the guard's own errors in the chain.
    fn fetch_error(&self, url: &str, e: reqwest::Error) -> MediaError {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cause {
            if let Some(f) = c.downcast_ref::<ForbiddenAddress>() {
                return MediaError::Forbidden { url: url.to_string(), addr: f.addr, reason: f.reason };
            }
            if let Some(r) = c.downcast_ref::<RedirectRefused>() {
                return match r {
                    RedirectRefused::TooMany => {
                        MediaError::TooManyRedirects { url: url.to_string(), max: self.cfg.max_redirects }
                    }
                    RedirectRefused::Forbidden { addr, reason } => {
                        MediaError::Forbidden { url: url.to_string(), addr: *addr, reason }
                    }
                    RedirectRefused::Scheme(_) => MediaError::Fetch { url: url.to_string(), why: r.to_string() },
                };
            }
            cause = c.source();
        }
        if e.is_timeout() {
            return MediaError::Timeout { url: url.to_string(), secs: self.cfg.fetch_timeout.as_secs().max(1) };
        }
        // reqwest's Display hides the cause ("error sending request"); show the chain.
        let mut why = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            why.push_str(": ");
            why.push_str(&c.to_string());
            cause = c.source();
        }
        MediaError::Fetch { url: url.to_string(), why }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MediaError> + Send + 'static,
) -> Result<T, MediaError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| MediaError::Fetch { url: String::new(), why: e.to_string() })?
}

/// Where an `image_url` points.
#[derive(Debug, PartialEq)]
enum Source {
    Data,
    Http,
    Local(String),
}

impl Source {
    fn of(url: &str) -> Result<Source, MediaError> {
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        if lower.starts_with("data:") {
            return Ok(Source::Data);
        }
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return Ok(Source::Http);
        }
        if lower.starts_with("file:") {
            return Ok(Source::Local(file_url_path(url)?));
        }
        // Any other `scheme:` (RFC 3986: a letter, then letters, digits, + - .) is unsupported;
        // everything else is a path.
        if let Some((scheme, _)) = url.split_once(':') {
            let mut cs = scheme.chars();
            if scheme.len() > 1
                && cs.next().is_some_and(|c| c.is_ascii_alphabetic())
                && cs.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            {
                return Err(MediaError::UnsupportedScheme { url: short(url) });
            }
        }
        Ok(Source::Local(url.to_string()))
    }
}

/// The path of a `file:` URL (`file:///abs/path` or `file://localhost/abs/path`), percent-decoded.
fn file_url_path(url: &str) -> Result<String, MediaError> {
    let rest = &url[5..];
    let rest = match rest.strip_prefix("//") {
        Some(r) if r.starts_with('/') => r,
        Some(r) if r.len() >= 10 && r[..9].eq_ignore_ascii_case("localhost") && r[9..].starts_with('/') => &r[9..],
        Some(_) => {
            return Err(MediaError::BadUrl {
                url: short(url),
                why: "a file URL must name a local absolute path (file:///path)".into(),
            })
        }
        None => rest,
    };
    percent_decode(rest).ok_or_else(|| MediaError::BadUrl { url: short(url), why: "bad percent-encoding".into() })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The payload of a `data:[<type>][;params];base64,<data>` URL. The media type, when given, must be
/// an image type (the content itself is recognised by its bytes later). Whitespace in the payload is
/// ignored; the standard and URL-safe alphabets are accepted, with or without padding. The size is
/// checked before decoding.
pub fn parse_data_url(url: &str, max_bytes: usize) -> Result<Vec<u8>, MediaError> {
    let bad = |why: &str| MediaError::BadDataUrl(why.to_string());
    let rest = url.get(5..).filter(|_| url[..5].eq_ignore_ascii_case("data:")).ok_or_else(|| bad("no data: prefix"))?;
    let Some((header, payload)) = rest.split_once(',') else {
        return Err(bad("no comma between the media type and the data (expected data:image/png;base64,...)"));
    };
    let mut fields = header.split(';').map(str::trim);
    let media_type = fields.next().unwrap_or("").to_ascii_lowercase();
    let is_base64 = fields.any(|f| f.eq_ignore_ascii_case("base64"));
    if !(media_type.is_empty() || media_type.starts_with("image/") || media_type == "application/octet-stream") {
        return Err(bad(&format!("media type {media_type:?} is not an image type")));
    }
    if !is_base64 {
        return Err(bad("only base64 data URLs are supported (data:image/png;base64,...)"));
    }
    // Upper bound of the decoded size, before decoding anything.
    let estimate = payload.len() / 4 * 3;
    if estimate > max_bytes.saturating_add(3) {
        return Err(MediaError::TooManyBytes { bytes: estimate as u64, limit: max_bytes });
    }
    let clean: Vec<u8> = payload.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    if clean.is_empty() {
        return Err(bad("the data is empty"));
    }
    let cfg = base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent);
    let standard = base64::engine::GeneralPurpose::new(&base64::alphabet::STANDARD, cfg);
    let url_safe = base64::engine::GeneralPurpose::new(&base64::alphabet::URL_SAFE, cfg);
    let bytes = standard
        .decode(&clean)
        .or_else(|e| url_safe.decode(&clean).map_err(|_| e))
        .map_err(|e| bad(&format!("the base64 data is invalid: {e}")))?;
    if bytes.len() > max_bytes {
        return Err(MediaError::TooManyBytes { bytes: bytes.len() as u64, limit: max_bytes });
    }
    Ok(bytes)
}

/// Reads a local picture: only inside the allowed directory, after resolving `..` and symlinks.
fn read_local(raw: &str, cfg: &MediaConfig) -> Result<Vec<u8>, MediaError> {
    let Some(root) = &cfg.allowed_local_path else { return Err(MediaError::LocalNotAllowed { path: short(raw) }) };
    let outside = || MediaError::OutsideDir { path: short(raw), dir: root.display().to_string() };
    let given = Path::new(raw);
    let joined = if given.is_absolute() { given.to_path_buf() } else { root.join(given) };
    // First lexically (so nothing outside is even looked at), then for real (symlinks).
    let mut lexical = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                if !lexical.pop() {
                    return Err(outside());
                }
            }
            Component::CurDir => {}
            c => lexical.push(c),
        }
    }
    if !lexical.starts_with(root) {
        return Err(outside());
    }
    let local = |why: String| MediaError::Local { path: short(raw), why };
    let canon = std::fs::canonicalize(&lexical).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => local("no such file".into()),
        _ => local(e.to_string()),
    })?;
    if !canon.starts_with(root) {
        return Err(outside());
    }
    let file = std::fs::File::open(&canon).map_err(|e| local(e.to_string()))?;
    let meta = file.metadata().map_err(|e| local(e.to_string()))?;
    if !meta.is_file() {
        return Err(local("not a regular file".into()));
    }
    if meta.len() > cfg.max_image_bytes as u64 {
        return Err(MediaError::TooManyBytes { bytes: meta.len(), limit: cfg.max_image_bytes });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    use std::io::Read;
    file.take(cfg.max_image_bytes as u64 + 1).read_to_end(&mut bytes).map_err(|e| local(e.to_string()))?;
    if bytes.len() > cfg.max_image_bytes {
        return Err(MediaError::TooManyBytes { bytes: bytes.len() as u64, limit: cfg.max_image_bytes });
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------
// Decoding

/// A decoded picture: its size and, when asked for, the preprocessed pixels.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub width: u32,
    pub height: u32,
    /// `[3, size, size]` f32, CHW, as `qvc_model::image::preprocess` makes them.
    pub pixels: Option<Vec<f32>>,
}

/// The size from the header alone (nothing proportional to the pixel count is allocated), checked
/// against the pixel limit.
pub fn dimensions(bytes: &[u8], max_pixels: u64) -> Result<(u32, u32), MediaError> {
    if bytes.is_empty() {
        return Err(MediaError::Decode("the image is empty (0 bytes)".into()));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| MediaError::Decode(e.to_string()))?;
    use image::ImageFormat as F;
    if !matches!(reader.format(), Some(F::Png | F::Jpeg | F::WebP | F::Gif | F::Bmp)) {
        return Err(MediaError::Decode("not an image in a supported format (PNG, JPEG, WebP, GIF, BMP)".into()));
    }
    let (width, height) = reader.into_dimensions().map_err(|e| MediaError::Decode(e.to_string()))?;
    if width as u64 * height as u64 > max_pixels {
        return Err(MediaError::TooManyPixels { width, height, limit: max_pixels });
    }
    Ok((width, height))
}

/// Checks the pixel limit, decodes (which validates the whole picture) and, unless `size` is `None`
/// (the engine already holds this picture's features), preprocesses to `[3, size, size]`.
/// CPU-heavy: call it on a blocking thread.
pub fn decode(bytes: &[u8], max_pixels: u64, size: Option<usize>) -> Result<Decoded, MediaError> {
    let (width, height) = dimensions(bytes, max_pixels)?;
    let Some(size) = size else { return Ok(Decoded { width, height, pixels: None }) };
    let img = decode_rgb(bytes, "the image").map_err(|e| MediaError::Decode(e.to_string()))?;
    let pixels = preprocess_rgb(&img, size as u32, "the image").map_err(|e| MediaError::Decode(e.to_string()))?;
    Ok(Decoded { width: img.width, height: img.height, pixels: Some(pixels) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forbidden_addresses() {
        for (a, why) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("100.127.255.255", "carrier-grade NAT"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("fd00::1", "unique local"),
            ("fc00::1", "unique local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::127.0.0.1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:7f00:1::", "loopback"),
            ("2001:db8::1", "documentation"),
        ] {
            let r = forbidden_reason(ip(a));
            assert!(r.is_some_and(|r| r.contains(why)), "{a}: {r:?}, expected {why}");
        }
        for a in ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "169.255.0.1", "2606:4700::1111", "::ffff:8.8.8.8"]
        {
            assert_eq!(forbidden_reason(ip(a)), None, "{a} is public");
        }
    }

    #[test]
    fn resolver_filter_keeps_public_addresses_only() {
        let sa = |s: &str| SocketAddr::new(ip(s), 0);
        let ok = GuardedResolver::filter("h", vec![sa("10.0.0.1"), sa("8.8.8.8")]).unwrap();
        assert_eq!(ok, vec![sa("8.8.8.8")]);
        let e = GuardedResolver::filter("localhost", vec![sa("127.0.0.1"), sa("::1")]).unwrap_err();
        assert_eq!(e.addr, ip("127.0.0.1"));
        assert_eq!(e.reason, "loopback");
    }

    #[test]
    fn ip_literals_are_recognised_in_every_spelling() {
        let lit = |u: &str| ip_literal(&reqwest::Url::parse(u).unwrap());
        assert_eq!(lit("http://127.0.0.1:8080/a.png"), Some(ip("127.0.0.1")));
        assert_eq!(lit("http://[::1]/a.png"), Some(ip("::1")));
        assert_eq!(lit("http://2130706433/"), Some(ip("127.0.0.1")), "decimal IPv4");
        assert_eq!(lit("http://0x7f.1/"), Some(ip("127.0.0.1")), "hex/short IPv4");
        assert_eq!(lit("http://[::ffff:7f00:1]/"), Some(ip("::ffff:127.0.0.1")));
        assert_eq!(lit("http://example.com/"), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn private_literals_are_refused_before_connecting() {
        let f = Fetcher::new(MediaConfig::default()).unwrap();
        for url in ["http://127.0.0.1:9/x.png", "http://[::1]:9/x.png", "https://169.254.169.254/latest", "http://0/"] {
            let e = f.bytes(url).await.unwrap_err();
            assert!(matches!(e, MediaError::Forbidden { .. }), "{url}: {e}");
            assert_eq!(e.code(), "image_url_forbidden");
            assert!(e.to_string().contains("--allow-private-urls"), "{e}");
        }
        // A name that resolves to loopback only is refused by the resolver, before any connection.
        let e = f.bytes("http://localhost:9/x.png").await.unwrap_err();
        assert!(matches!(e, MediaError::Forbidden { reason: "loopback", .. }), "{e}");
    }

    #[test]
    fn sources() {
        assert_eq!(Source::of("data:image/png;base64,AA").unwrap(), Source::Data);
        assert_eq!(Source::of("DATA:image/png;base64,AA").unwrap(), Source::Data);
        assert_eq!(Source::of("HTTPS://x/y").unwrap(), Source::Http);
        assert_eq!(Source::of("file:///tmp/a%20b.png").unwrap(), Source::Local("/tmp/a b.png".into()));
        assert_eq!(Source::of("file://localhost/tmp/a.png").unwrap(), Source::Local("/tmp/a.png".into()));
        assert!(matches!(Source::of("file://server/share/a.png"), Err(MediaError::BadUrl { .. })));
        assert_eq!(Source::of("pics/a.png").unwrap(), Source::Local("pics/a.png".into()));
        assert_eq!(Source::of("/abs/a:b.png").unwrap(), Source::Local("/abs/a:b.png".into()));
        for u in ["ftp://x/a.png", "gopher://x", "javascript:alert(1)"] {
            assert!(matches!(Source::of(u), Err(MediaError::UnsupportedScheme { .. })), "{u}");
        }
    }

    #[test]
    fn data_urls() {
        assert_eq!(parse_data_url("data:image/png;base64,aGVsbG8=", 100).unwrap(), b"hello");
        assert_eq!(parse_data_url("data:image/jpeg;base64,aGVsbG8", 100).unwrap(), b"hello", "no padding");
        assert_eq!(parse_data_url("data:;base64,aGVs\nbG8=", 100).unwrap(), b"hello", "line breaks");
        assert_eq!(parse_data_url("data:image/png;base64,-_8=", 100).unwrap(), vec![0xfb, 0xff], "url-safe");
        assert_eq!(parse_data_url("data:image/png;charset=x;base64,aGk=", 100).unwrap(), b"hi");
        let e = |u: &str| parse_data_url(u, 100).unwrap_err().to_string();
        assert!(e("data:image/png,rawbytes").contains("only base64"));
        assert!(e("data:text/plain;base64,aGk=").contains("not an image type"));
        assert!(e("data:image/png;base64").contains("no comma"));
        assert!(e("data:image/png;base64,@@@@").contains("base64 data is invalid"));
        assert!(e("data:image/png;base64,").contains("empty"));
        let big = format!("data:image/png;base64,{}", "A".repeat(400));
        let err = parse_data_url(&big, 100).unwrap_err();
        assert!(matches!(err, MediaError::TooManyBytes { limit: 100, .. }), "{err}");
        assert_eq!(err.code(), "image_too_large");
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decoding_checks_pixels_first_and_preprocesses() {
        let bytes = png(20, 10);
        let d = decode(&bytes, 1000, Some(8)).unwrap();
        assert_eq!((d.width, d.height), (20, 10));
        assert_eq!(d.pixels.as_ref().map(Vec::len), Some(3 * 8 * 8));
        let d = decode(&bytes, 1000, None).unwrap();
        assert!(d.pixels.is_none());
        let e = decode(&bytes, 199, Some(8)).unwrap_err();
        assert!(matches!(e, MediaError::TooManyPixels { width: 20, height: 10, limit: 199 }), "{e}");
        assert!(e.to_string().contains("--max-image-pixels"));
        let e = decode(b"GIF89a but not really", u64::MAX, Some(8)).unwrap_err();
        assert_eq!(e.code(), "image_decode_failed");
        let e = decode(b"plain text", 1000, Some(8)).unwrap_err();
        assert!(e.to_string().contains("supported format"), "{e}");
        let mut truncated = png(20, 10);
        truncated.truncate(60);
        assert_eq!(decode(&truncated, 1000, Some(8)).unwrap_err().code(), "image_decode_failed");
    }

    #[test]
    fn local_files_only_inside_the_allowed_dir() {
        let base = std::env::temp_dir().join(format!("qvc-media-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let inside = base.join("allowed");
        std::fs::create_dir_all(inside.join("sub")).unwrap();
        std::fs::write(inside.join("sub/a.png"), png(2, 2)).unwrap();
        std::fs::write(base.join("secret.png"), png(2, 2)).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(base.join("secret.png"), inside.join("link.png")).unwrap();

        let none = MediaConfig::default();
        assert!(matches!(read_local("sub/a.png", &none), Err(MediaError::LocalNotAllowed { .. })));

        let cfg = MediaConfig::default().with_local_dir(&inside).unwrap();
        assert_eq!(read_local("sub/a.png", &cfg).unwrap(), png(2, 2));
        let abs = inside.join("sub/a.png");
        assert!(read_local(abs.to_str().unwrap(), &cfg).is_ok());
        assert!(read_local("./sub/../sub/a.png", &cfg).is_ok());
        for escape in
            ["../secret.png", "sub/../../secret.png", base.join("secret.png").to_str().unwrap(), "/etc/passwd"]
        {
            let e = read_local(escape, &cfg).unwrap_err();
            assert!(matches!(e, MediaError::OutsideDir { .. }), "{escape}: {e}");
            assert_eq!(e.code(), "local_media_forbidden");
        }
        #[cfg(unix)]
        assert!(matches!(read_local("link.png", &cfg), Err(MediaError::OutsideDir { .. })), "symlink out");
        assert!(read_local("missing.png", &cfg).unwrap_err().to_string().contains("no such file"));
        assert!(read_local("sub", &cfg).unwrap_err().to_string().contains("not a regular file"));
        let small = MediaConfig { max_image_bytes: 10, ..cfg.clone() };
        assert!(matches!(read_local("sub/a.png", &small), Err(MediaError::TooManyBytes { .. })));
        assert!(MediaConfig::default().with_local_dir(&base.join("nope")).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// A tiny HTTP/1.1 server on 127.0.0.1 for the download tests: `/img` a PNG, `/big` a PNG with
    /// Content-Length, `/endless` a chunked body that never ends, `/r/N` a chain of N redirects to
    /// `/img`, `/404`, `/slow` that never answers. Returns its address.
    fn test_server() -> SocketAddr {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().take(64) {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut line = String::new();
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    reader.read_line(&mut line).unwrap();
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let body = png(4, 3);
                    let head =
                        |status: &str, extra: &str| format!("HTTP/1.1 {status}\r\n{extra}Connection: close\r\n\r\n");
                    let _ = match path.as_str() {
                        "/img" => conn
                            .write_all(head("200 OK", &format!("Content-Length: {}\r\n", body.len())).as_bytes())
                            .and_then(|_| conn.write_all(&body)),
                        "/big" => conn.write_all(head("200 OK", "Content-Length: 100000000\r\n").as_bytes()),
                        "/endless" => {
                            let _ = conn.write_all(head("200 OK", "Transfer-Encoding: chunked\r\n").as_bytes());
                            let chunk = format!("1000\r\n{}\r\n", "x".repeat(0x1000));
                            for _ in 0..10_000 {
                                if conn.write_all(chunk.as_bytes()).is_err() {
                                    break;
                                }
                            }
                            Ok(())
                        }
                        "/slow" => {
                            std::thread::sleep(Duration::from_secs(5));
                            Ok(())
                        }
                        p if p.starts_with("/r/") => {
                            let n: usize = p[3..].parse().unwrap();
                            let next = if n <= 1 { "/img".to_string() } else { format!("/r/{}", n - 1) };
                            conn.write_all(
                                head("302 Found", &format!("Location: {next}\r\nContent-Length: 0\r\n")).as_bytes(),
                            )
                        }
                        _ => conn.write_all(head("404 Not Found", "Content-Length: 0\r\n").as_bytes()),
                    };
                });
            }
        });
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn downloads_with_limits_and_redirects() {
        let addr = test_server();
        let cfg = MediaConfig {
            allow_private_urls: true,
            max_image_bytes: 1 << 20,
            fetch_timeout: Duration::from_secs(1),
            ..MediaConfig::default()
        };
        let f = Fetcher::new(cfg).unwrap();
        let url = |p: &str| format!("http://{addr}{p}");
        assert_eq!(f.bytes(&url("/img")).await.unwrap(), png(4, 3));
        assert_eq!(f.bytes(&url("/r/3")).await.unwrap(), png(4, 3), "3 redirects are followed");
        let e = f.bytes(&url("/r/4")).await.unwrap_err();
        assert!(matches!(e, MediaError::TooManyRedirects { max: 3, .. }), "{e}");
        let e = f.bytes(&url("/big")).await.unwrap_err();
        assert!(matches!(e, MediaError::TooManyBytes { bytes: 100000000, .. }), "announced size: {e}");
        let e = f.bytes(&url("/endless")).await.unwrap_err();
        assert!(matches!(e, MediaError::TooManyBytes { limit: 1048576, .. }), "streamed size: {e}");
        let e = f.bytes(&url("/404")).await.unwrap_err();
        assert!(matches!(e, MediaError::HttpStatus { status: 404, .. }), "{e}");
        let e = f.bytes(&url("/slow")).await.unwrap_err();
        assert!(matches!(e, MediaError::Timeout { .. }), "{e}");
        assert_eq!(e.code(), "image_fetch_failed");

        // Without --allow-private-urls the same server is refused, by name and by address.
        let guarded = Fetcher::new(MediaConfig::default()).unwrap();
        let e = guarded.bytes(&url("/img")).await.unwrap_err();
        assert!(matches!(e, MediaError::Forbidden { .. }), "{e}");
        let e = guarded.bytes(&format!("http://localhost:{}/img", addr.port())).await.unwrap_err();
        assert!(matches!(e, MediaError::Forbidden { .. }), "{e}");
    }
}
