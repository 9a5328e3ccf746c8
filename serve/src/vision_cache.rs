//! A bounded LRU of vision features (`[256, D]` per picture) keyed by the
//! picture's [`ImageKey`]: a picture sent again (OpenAI clients resend the
//! whole conversation every turn) is never encoded again while it is cached.

use crate::request::ImageKey;
use std::collections::HashMap;
use std::sync::Arc;

/// Features of at most `capacity` pictures; the least recently used goes first.
#[derive(Debug)]
pub struct VisionCache {
    capacity: usize,
    clock: u64,
    entries: HashMap<ImageKey, (Arc<Vec<f32>>, u64)>,
}

impl VisionCache {
    /// A cache of `capacity` pictures (0 keeps nothing).
    pub fn new(capacity: usize) -> Self {
        VisionCache { capacity, clock: 0, entries: HashMap::new() }
    }

    /// The features of `key`, marking them used.
    pub fn get(&mut self, key: ImageKey) -> Option<Arc<Vec<f32>>> {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(&key).map(|(f, t)| {
            *t = now;
            f.clone()
        })
    }

    /// Whether `key` is cached (does not count as a use).
    pub fn contains(&self, key: ImageKey) -> bool {
        self.entries.contains_key(&key)
    }

    /// Keep `features` for `key`, dropping the least recently used entries
    /// beyond the capacity.
    pub fn insert(&mut self, key: ImageKey, features: Arc<Vec<f32>>) {
        if self.capacity == 0 {
            return;
        }
        self.clock += 1;
        self.entries.insert(key, (features, self.clock));
        while self.entries.len() > self.capacity {
            let oldest = self.entries.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k);
            match oldest {
                Some(k) => self.entries.remove(&k),
                None => break,
            };
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_goes_first() {
        let mut c = VisionCache::new(2);
        let f = |x: f32| Arc::new(vec![x]);
        c.insert(ImageKey(1), f(1.0));
        c.insert(ImageKey(2), f(2.0));
        assert_eq!(c.get(ImageKey(1)).unwrap()[0], 1.0);
        c.insert(ImageKey(3), f(3.0));
        assert!(c.contains(ImageKey(1)) && c.contains(ImageKey(3)));
        assert!(!c.contains(ImageKey(2)));
        assert_eq!(c.len(), 2);
        let mut none = VisionCache::new(0);
        none.insert(ImageKey(1), f(1.0));
        assert!(none.is_empty());
    }
}
