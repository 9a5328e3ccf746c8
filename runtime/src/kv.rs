//! The KV cache: per layer, the keys and values of every token seen so far,
//! as `[len, heads, head_dim]` rows. Programs read it as inputs and return
//! the new rows as outputs; the session appends them after each step, so the
//! graphs stay pure functions.

/// Keys and values of all layers for one sequence.
#[derive(Clone, Debug)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    row: usize,
    len: usize,
}

impl KvCache {
    /// An empty cache for `layers` layers of `row` = heads × head_dim floats per token.
    pub fn new(layers: usize, row: usize) -> Self {
        KvCache { k: vec![Vec::new(); layers], v: vec![Vec::new(); layers], row, len: 0 }
    }
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn layers(&self) -> usize {
        self.k.len()
    }
    /// Cached keys and values of `layer`, `len × row` floats each.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let n = self.len * self.row;
        (&self.k[layer][..n], &self.v[layer][..n])
    }
    /// Append the rows of one step at the current length. Every layer must
    /// get the same number of rows; `commit` then advances the length.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        assert_eq!(k.len(), v.len(), "keys and values of one step differ in length");
        assert_eq!(k.len() % self.row, 0, "rows of {} floats expected", self.row);
        let (at, end) = (self.len * self.row, self.len * self.row + k.len());
        for (dst, src) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            if dst.len() < end {
                if dst.capacity() < end {
                    // Grow by doubling, and ask for huge pages once a layer's
                    // rows are megabytes: long-context decode streams them
                    // every token, as it does the weights.
                    dst.reserve_exact(end.max(2 * dst.capacity()) - dst.len());
                    qvc_kernels::pages::advise_huge(dst.spare_capacity_mut());
                }
                dst.resize(end, 0.0);
            }
            dst[at..end].copy_from_slice(src);
        }
    }
    /// Record that every layer received `n` more rows.
    pub fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.k.iter().all(|k| k.len() >= self.len * self.row));
    }
    /// Record `n` more rows that live elsewhere (a backend that keeps the
    /// cache on its device): only the length is tracked here.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
    /// Forget everything after the first `len` tokens. The storage is kept:
    /// rows past the length are never read as keys.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
    /// Make every layer hold at least `rows` rows (zeros past the length), so
    /// [`bucket`](Self::bucket) can hand out a shape bucket of that size.
    pub fn reserve_rows(&mut self, rows: usize) {
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            if l.len() < rows * self.row {
                l.resize(rows * self.row, 0.0);
            }
        }
    }
    /// The first `rows` rows of `layer` (keys, values) for a program compiled
    /// for a padded cache of `rows` rows: only the first [`len`](Self::len)
    /// are real. Call [`reserve_rows`](Self::reserve_rows) first.
    pub fn bucket(&self, layer: usize, rows: usize) -> (&[f32], &[f32]) {
        let n = rows * self.row;
        (&self.k[layer][..n], &self.v[layer][..n])
    }
    /// Bytes of cached rows (the real ones, not the padding).
    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.len * self.row * 4
    }
}
